// CPU kernel of Perturbed Masking's distance, fastml::perturbed_masking_distance (schema and semantics in
// fastml/ops/perturbed_masking/schema.py).
//
// Output m reads the word vector v = mean(states[rows[m], starts[m]:ends[m], :]) and compares it with the anchor
// a = anchors[anchor_index[m]]: ||a - v|| (euclidean) or 1 - a.v / max(||a|| ||v||, 1e-8) (cosine). The word vector
// is never written out: the hidden dim is walked in blocks of kBlock, each block's span sum is formed in a stack
// buffer (in L1) and folded at once into the running sums (squared difference, or dot and both squared norms), all
// in the accumulation type (float for half types and float, double for double). Outputs are independent, so tasks
// of whole outputs run in parallel; each output's sums run in a fixed order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "common.h"

namespace {

constexpr int64_t kBlock = 256;
constexpr double kCosineEps = 1e-8;

template <typename scalar_t, typename A>
A one_distance(const scalar_t* states, int64_t T, int64_t D, int64_t row, int64_t start, int64_t end,
               const scalar_t* anchor, bool cosine) {
  const scalar_t* base = states + (row * T + start) * D;
  const int64_t len = end - start;
  const A inv_len = A(1) / static_cast<A>(len);
  A sq = 0, dot = 0, aa = 0, vv = 0;
  A v[kBlock];
  for (int64_t lo = 0; lo < D; lo += kBlock) {
    const int64_t n = std::min(kBlock, D - lo);
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) v[d] = static_cast<A>(base[lo + d]);
    for (int64_t t = 1; t < len; ++t) {
      const scalar_t* x = base + t * D + lo;
#pragma omp simd
      for (int64_t d = 0; d < n; ++d) v[d] += static_cast<A>(x[d]);
    }
    if (cosine) {
#pragma omp simd reduction(+ : dot, aa, vv)
      for (int64_t d = 0; d < n; ++d) {
        const A a = static_cast<A>(anchor[lo + d]), w = v[d] * inv_len;
        dot += a * w;
        aa += a * a;
        vv += w * w;
      }
    } else {
#pragma omp simd reduction(+ : sq)
      for (int64_t d = 0; d < n; ++d) {
        const A diff = static_cast<A>(anchor[lo + d]) - v[d] * inv_len;
        sq += diff * diff;
      }
    }
  }
  if (!cosine) return std::sqrt(sq);
  const A norms = std::sqrt(aa) * std::sqrt(vv);
  return A(1) - dot / std::max(norms, static_cast<A>(kCosineEps));
}

at::Tensor perturbed_masking_distance_cpu(const at::Tensor& states, const at::Tensor& rows, const at::Tensor& starts,
                                          const at::Tensor& ends, const at::Tensor& anchors,
                                          const at::Tensor& anchor_index, c10::string_view metric) {
  TORCH_CHECK(states.dim() == 3 && states.is_contiguous(), "states must be a contiguous [R, T, D] tensor, got ",
              states.sizes());
  TORCH_CHECK(at::isFloatingType(states.scalar_type()), "states must be a floating tensor");
  const int64_t R = states.size(0), T = states.size(1), D = states.size(2);
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(1) == D && anchors.is_contiguous() &&
                  anchors.scalar_type() == states.scalar_type(),
              "anchors must be a contiguous [W, D] tensor of states' dtype");
  const int64_t M = rows.numel(), W = anchors.size(0);
  for (const at::Tensor* t : {&rows, &starts, &ends, &anchor_index}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == M && t->scalar_type() == at::kLong && t->is_contiguous(),
                "rows, starts, ends and anchor_index must be contiguous int64 tensors of one length");
  }
  const bool cosine = metric == "cosine";
  TORCH_CHECK(cosine || metric == "euclidean", "metric must be 'euclidean' or 'cosine', got '", std::string(metric),
              "'");
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* ep = ends.data_ptr<int64_t>();
  const int64_t* ap = anchor_index.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(rp[m] >= 0 && rp[m] < R, "rows[", m, "] = ", rp[m], " is outside [0, ", R, ")");
    TORCH_CHECK(sp[m] >= 0 && sp[m] < ep[m] && ep[m] <= T, "span [", sp[m], ", ", ep[m], ") of output ", m,
                " must be non-empty and inside [0, ", T, "]");
    TORCH_CHECK(ap[m] >= 0 && ap[m] < W, "anchor_index[", m, "] = ", ap[m], " is outside [0, ", W, ")");
  }
  const auto acc = states.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({M}, states.options().dtype(acc));
  if (M == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, states.scalar_type(), "perturbed_masking_distance", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xs = states.data_ptr<scalar_t>();
    const scalar_t* as = anchors.data_ptr<scalar_t>();
    A* op = out.data_ptr<A>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        op[m] = one_distance<scalar_t, A>(xs, T, D, rp[m], sp[m], ep[m], as + ap[m] * D, cosine);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastml, CPU, m) { m.impl("perturbed_masking_distance", &perturbed_masking_distance_cpu); }
