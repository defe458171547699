// CPU kernels of the integrated-gradients path ops (schemas and semantics in csrc/fastml.cpp).
//
// ig_scale_inputs writes the S scaled copies of the inputs, step-major: out[s*B + b] = x'[b] + a[s] (x[b] - x'[b]).
// ig_accumulate contracts the step axis of the gradients with the quadrature weights, adds the running sum of
// earlier chunks, multiplies by (x - x') and sums each example, in one pass over the gradients.
// Half types are read and written in their own dtype and computed in float32 (at::opmath_type).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

// Elements of one example handled by one task: large enough to amortize the task, small enough that the
// running-sum tile stays in L1/L2 while every step's gradients stream through it.
constexpr int64_t kTile = 2048;

void check_path_args(const at::Tensor& inputs, const at::Tensor& baselines, const at::Tensor& vec,
                     const char* vec_name) {
  TORCH_CHECK(inputs.dim() >= 1, "inputs must have a batch dimension");
  TORCH_CHECK(baselines.sizes() == inputs.sizes(), "baselines must have the shape of inputs, got ",
              baselines.sizes(), " and ", inputs.sizes());
  TORCH_CHECK(baselines.scalar_type() == inputs.scalar_type(), "baselines must have the dtype of inputs");
  TORCH_CHECK(vec.dim() == 1, vec_name, " must be one-dimensional, got shape ", vec.sizes());
  TORCH_CHECK(vec.is_floating_point(), vec_name, " must be a floating tensor");
  TORCH_CHECK(inputs.is_floating_point(), "inputs must be a floating tensor");
}

at::Tensor ig_scale_inputs_cpu(const at::Tensor& inputs, const at::Tensor& baselines, const at::Tensor& alphas) {
  check_path_args(inputs, baselines, alphas, "alphas");
  const auto x = inputs.contiguous();
  const auto xb = baselines.contiguous();
  const int64_t S = alphas.size(0);
  const int64_t N = x.numel();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] *= S;
  auto out = at::empty(shape, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ig_scale_inputs", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto a = alphas.to(at::CppTypeToScalarType<opmath_t>::value).contiguous();
    const opmath_t* ap = a.data_ptr<opmath_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = xb.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t tiles = (N + kTile - 1) / kTile;
    at::parallel_for(0, S * tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / tiles;
        const int64_t lo = (task % tiles) * kTile;
        const int64_t hi = std::min(N, lo + kTile);
        const opmath_t alpha = ap[s];
        scalar_t* dst = op + s * N;
        for (int64_t i = lo; i < hi; ++i) {
          const opmath_t b = static_cast<opmath_t>(bp[i]);
          dst[i] = static_cast<scalar_t>(b + alpha * (static_cast<opmath_t>(xp[i]) - b));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ig_accumulate_cpu(const at::Tensor& grads, const at::Tensor& inputs,
                                                     const at::Tensor& baselines, const at::Tensor& weights,
                                                     bool multiply_by_inputs, const c10::optional<at::Tensor>& acc) {
  check_path_args(inputs, baselines, weights, "weights");
  TORCH_CHECK(grads.scalar_type() == inputs.scalar_type(), "grads must have the dtype of inputs");
  const int64_t S = weights.size(0);
  const int64_t B = inputs.size(0);
  TORCH_CHECK(grads.dim() == inputs.dim() && grads.size(0) == S * B &&
                  grads.sizes().slice(1) == inputs.sizes().slice(1),
              "grads must have shape [S*B, ...] = [", S * B, ", ...] for inputs ", inputs.sizes(), ", got ",
              grads.sizes());
  const auto acc_dtype = inputs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (acc.has_value()) {
    TORCH_CHECK(acc->sizes() == inputs.sizes(), "acc must have the shape of inputs, got ", acc->sizes());
    TORCH_CHECK(acc->scalar_type() == acc_dtype, "acc must have dtype ", acc_dtype, ", got ", acc->scalar_type());
  }
  const auto g = grads.contiguous();
  const auto x = inputs.contiguous();
  const auto xb = baselines.contiguous();
  const auto prev = acc.has_value() ? acc->contiguous() : at::Tensor();
  auto attr = at::empty(inputs.sizes(), inputs.options().dtype(acc_dtype));
  auto sums = at::empty({B}, inputs.options().dtype(acc_dtype));
  const int64_t D = B == 0 ? 0 : x.numel() / B;
  const int64_t tiles = (D + kTile - 1) / kTile;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ig_accumulate", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto w = weights.to(at::CppTypeToScalarType<opmath_t>::value).contiguous();
    const opmath_t* wp = w.data_ptr<opmath_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = xb.data_ptr<scalar_t>();
    const opmath_t* accp = prev.defined() ? prev.data_ptr<opmath_t>() : nullptr;
    opmath_t* outp = attr.data_ptr<opmath_t>();
    // One partial sum per (example, tile), reduced in a fixed order afterwards: deterministic for any thread count.
    std::vector<opmath_t> partial(static_cast<size_t>(B * tiles), opmath_t(0));
    at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tiles;
        const int64_t lo = (task % tiles) * kTile;
        const int64_t n = std::min(D, lo + kTile) - lo;
        const int64_t base = b * D + lo;
        opmath_t* total = outp + base;
        if (accp != nullptr) {
          std::copy(accp + base, accp + base + n, total);
        } else {
          std::fill(total, total + n, opmath_t(0));
        }
        for (int64_t s = 0; s < S; ++s) {
          const opmath_t ws = wp[s];
          const scalar_t* gs = gp + s * B * D + base;
          for (int64_t i = 0; i < n; ++i) {
            total[i] += ws * static_cast<opmath_t>(gs[i]);
          }
        }
        opmath_t sum = 0;
        if (multiply_by_inputs) {
          for (int64_t i = 0; i < n; ++i) {
            const opmath_t diff = static_cast<opmath_t>(xp[base + i]) - static_cast<opmath_t>(bp[base + i]);
            total[i] *= diff;
            sum += total[i];
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            sum += total[i];
          }
        }
        partial[task] = sum;
      }
    });
    opmath_t* sp = sums.data_ptr<opmath_t>();
    for (int64_t b = 0; b < B; ++b) {
      opmath_t sum = 0;
      for (int64_t t = 0; t < tiles; ++t) {
        sum += partial[b * tiles + t];
      }
      sp[b] = sum;
    }
  });
  return {attr, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastml, CPU, m) {
  m.impl("ig_scale_inputs", &ig_scale_inputs_cpu);
  m.impl("ig_accumulate", &ig_accumulate_cpu);
}
