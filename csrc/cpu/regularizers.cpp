// CPU kernels of softmax_kl, fastml::softmax_kl_{fwd,bwd} (schemas and semantics in
// fastml/ops/regularizers/schema.py).
//
// With a = p / T and b = q / T, one read of each row pair from memory, block by block (each block in L1): running
// maxima of a and of b, running sums of exp(a - max_a) and exp(b - max_b), and the running sum of
// exp(a - max_a) (a - b), all rescaled when a maximum grows. They give lse_a, lse_b and E = E_P[a - b], hence
// KL = E - lse_a + lse_b. When the gradient is wanted in the forward, the same row is walked again right after,
// from cache, writing dKL/dp = P (a - b - E) / T and dKL/dq = (Q - P) / T. No probability tensor is materialized.
// Rows are independent: tasks of whole rows run in parallel and the loss of each row is written separately (the
// caller's sum over rows is a fixed-order reduction). Half types are read and written in their dtype and computed
// in float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"

namespace {

constexpr int64_t kBlock = 512;
constexpr int64_t kTaskElems = 32768;

template <typename scalar_t, typename A>
inline void load_scaled(const scalar_t* x, int64_t n, A inv_t, A* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<A>(x[j]) * inv_t;
}

template <typename A>
struct RowStats {
  A lse_a, lse_b, e;
};

template <typename scalar_t, typename A>
RowStats<A> row_stats(const scalar_t* p, const scalar_t* q, int64_t C, A inv_t, A* a, A* b) {
  const A ninf = -std::numeric_limits<A>::infinity();
  A ma = ninf, mb = ninf, sa = 0, sb = 0, t = 0;
  for (int64_t lo = 0; lo < C; lo += kBlock) {
    const int64_t n = std::min(kBlock, C - lo);
    load_scaled(p + lo, n, inv_t, a);
    load_scaled(q + lo, n, inv_t, b);
    A bma = ninf, bmb = ninf;
#pragma omp simd reduction(max : bma, bmb)
    for (int64_t j = 0; j < n; ++j) {
      bma = a[j] > bma ? a[j] : bma;
      bmb = b[j] > bmb ? b[j] : bmb;
    }
    if (bma > ma) {
      const A f = std::exp(ma - bma);
      sa *= f;
      t *= f;
      ma = bma;
    }
    if (bmb > mb) {
      sb *= std::exp(mb - bmb);
      mb = bmb;
    }
    A bsa = 0, bsb = 0, bt = 0;
    // While a maximum is still -inf, so is every value seen: taking exponentials against 0 gives them 0, not NaN.
    const A cma = ma == ninf ? A(0) : ma, cmb = mb == ninf ? A(0) : mb;
#pragma omp simd reduction(+ : bsa, bsb, bt)
    for (int64_t j = 0; j < n; ++j) {
      const A ea = fastml::exp_or_zero(a[j] - cma);
      bsa += ea;
      bsb += fastml::exp_or_zero(b[j] - cmb);
      bt += ea > A(0) ? ea * (a[j] - b[j]) : A(0);  // a class P gives no weight adds nothing (even where b = -inf)
    }
    sa += bsa;
    sb += bsb;
    t += bt;
  }
  return {ma + std::log(sa), mb + std::log(sb), t / sa};
}

// dp = sc * P (a - b - E) / T, dq = sc * (Q - P) / T over one row.
template <typename scalar_t, typename A>
void row_grad(const scalar_t* p, const scalar_t* q, int64_t C, A inv_t, const RowStats<A>& st, A sc, A* a, A* b,
              scalar_t* dp, scalar_t* dq) {
  const A k = sc * inv_t;
  for (int64_t lo = 0; lo < C; lo += kBlock) {
    const int64_t n = std::min(kBlock, C - lo);
    load_scaled(p + lo, n, inv_t, a);
    load_scaled(q + lo, n, inv_t, b);
    scalar_t* op = dp + lo;
    scalar_t* oq = dq + lo;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const A pa = fastml::exp_or_zero(a[j] - st.lse_a);
      const A qb = fastml::exp_or_zero(b[j] - st.lse_b);
      op[j] = static_cast<scalar_t>(pa > A(0) ? k * pa * (a[j] - b[j] - st.e) : A(0));
      oq[j] = static_cast<scalar_t>(k * (qb - pa));
    }
  }
}

template <typename F>
void for_rows(int64_t N, int64_t C, F f) {
  const int64_t per = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(C, 1));
  const int64_t tasks = (N + per - 1) / per;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) f(t * per, std::min(N, (t + 1) * per));
  });
}

void check(const at::Tensor& p, const at::Tensor& q, double temperature) {
  TORCH_CHECK(p.dim() == 2, "p_logits must be [N, C], got ", p.sizes());
  TORCH_CHECK(q.sizes() == p.sizes() && q.scalar_type() == p.scalar_type(),
              "q_logits must have p_logits' shape and dtype");
  TORCH_CHECK(p.is_contiguous() && q.is_contiguous(), "p_logits and q_logits must be contiguous");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be positive and finite");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_kl_fwd_cpu(const at::Tensor& p,
                                                                              const at::Tensor& q, double temperature,
                                                                              double grad_scale, bool compute_grad) {
  check(p, q, temperature);
  const int64_t N = p.size(0), C = p.size(1);
  const auto acc = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto kl = at::empty({N}, p.options().dtype(acc));
  auto stats = at::empty({N, 3}, p.options().dtype(acc));
  auto dp = compute_grad ? at::empty_like(p) : p.new_empty({0});
  auto dq = compute_grad ? at::empty_like(p) : p.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "softmax_kl_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    A* klp = kl.data_ptr<A>();
    A* sp = stats.data_ptr<A>();
    scalar_t* dpp = compute_grad ? dp.data_ptr<scalar_t>() : nullptr;
    scalar_t* dqp = compute_grad ? dq.data_ptr<scalar_t>() : nullptr;
    const A inv_t = static_cast<A>(1.0 / temperature);
    const A sc = static_cast<A>(grad_scale);
    for_rows(N, C, [&](int64_t r0, int64_t r1) {
      A a[kBlock], b[kBlock];
      for (int64_t r = r0; r < r1; ++r) {
        const RowStats<A> st = row_stats<scalar_t, A>(pp + r * C, qp + r * C, C, inv_t, a, b);
        klp[r] = st.e - st.lse_a + st.lse_b;
        sp[3 * r] = st.lse_a;
        sp[3 * r + 1] = st.lse_b;
        sp[3 * r + 2] = st.e;
        if (compute_grad) {
          row_grad<scalar_t, A>(pp + r * C, qp + r * C, C, inv_t, st, sc, a, b, dpp + r * C, dqp + r * C);
        }
      }
    });
  });
  return {kl, stats, dp, dq};
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_bwd_cpu(const at::Tensor& grad, const at::Tensor& p, const at::Tensor& q,
                                                      const at::Tensor& stats, double temperature) {
  check(p, q, temperature);
  const int64_t N = p.size(0), C = p.size(1);
  const auto acc = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == N && grad.scalar_type() == acc && grad.is_contiguous(),
              "grad must be a contiguous [N] tensor of the accumulation dtype");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == 3 && stats.scalar_type() == acc &&
                  stats.is_contiguous(),
              "stats must be a contiguous [N, 3] tensor of the accumulation dtype");
  auto dp = at::empty_like(p), dq = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "softmax_kl_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const A* gp = grad.data_ptr<A>();
    const A* sp = stats.data_ptr<A>();
    scalar_t* dpp = dp.data_ptr<scalar_t>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    const A inv_t = static_cast<A>(1.0 / temperature);
    for_rows(N, C, [&](int64_t r0, int64_t r1) {
      A a[kBlock], b[kBlock];
      for (int64_t r = r0; r < r1; ++r) {
        const RowStats<A> st{sp[3 * r], sp[3 * r + 1], sp[3 * r + 2]};
        row_grad<scalar_t, A>(pp + r * C, qp + r * C, C, inv_t, st, gp[r], a, b, dpp + r * C, dqp + r * C);
      }
    });
  });
  return {dp, dq};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastml, CPU, m) {
  m.impl("softmax_kl_fwd", &softmax_kl_fwd_cpu);
  m.impl("softmax_kl_bwd", &softmax_kl_bwd_cpu);
}
