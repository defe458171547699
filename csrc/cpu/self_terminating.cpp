// CPU kernels of the self-terminating output layer, fastml::self_terminating_{fwd,nll_fwd,nll_bwd} (schemas and
// semantics in fastml/ops/self_terminating/schema.py).
//
// Rows (b, t) of logits [B, T, V] are independent except through log_alpha, which depends only on the eos logits.
// So each kernel first runs the cheap serial part over [B, T] (log_beta from the eos column, the cumulative sum
// over T; in the backward, the reverse cumulative sum of the log_alpha gradients), and then one parallel pass over
// rows (at::parallel_for): per row, the log-sum-exp over the vocabulary without eos, read once in blocks that stay
// in L1 with a running maximum (rescaled when it grows), then the row's output (log-probabilities or gradient)
// written right after while the row is still in cache (the NLL's fused gradient gets its eos column after the
// parallel pass, from the reverse cumulative sum). The exponentials are vectorized (fastml::exp_or_zero), the
// block reductions use explicit vectors (fastml::Vec).
// Half types are read and written in their dtype and computed in float32. Deterministic for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kBlock = 512;         // elements per step of the running maximum / sum
constexpr int64_t kTaskElems = 32768;   // rows are grouped into tasks of about this many logits

template <typename A>
inline A log1mexp(A x) {  // log(1 - exp(x)), x <= 0
  return x > A(-0.6931471805599453) ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x));
}

template <typename A>
inline A log_sigmoid(A x) {
  return x >= A(0) ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x));
}

template <typename A>
inline A sigmoid_neg(A x) {  // sigmoid(-x) = 1 - sigmoid(x)
  return x >= A(0) ? std::exp(-x) / (A(1) + std::exp(-x)) : A(1) / (A(1) + std::exp(x));
}

// The maximum and the sum of exp(z_j - m) of a block of n elements, n a multiple of the vector width (a block is
// padded with -inf). The reductions use explicit vectors (common.h): GCC left `omp simd reduction` loops scalar
// here. The exponentials are a plain map, which it does vectorize.
template <typename A>
inline A block_max(const A* z, int64_t n) {
  using V = fastml::Vec<A>;
  constexpr int64_t L = fastml::kLanes<A>;
  V acc = V{} - std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < n; j += L) {
    const V v = *reinterpret_cast<const V*>(z + j);
    acc = v > acc ? v : acc;
  }
  A m = acc[0];
  for (int64_t k = 1; k < L; ++k) m = acc[k] > m ? acc[k] : m;
  return m;
}

template <typename A>
inline A block_sum_exp(A* __restrict__ z, int64_t n, A m) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) z[j] = fastml::exp_or_zero(z[j] - m);
  using V = fastml::Vec<A>;
  constexpr int64_t L = fastml::kLanes<A>;
  V acc0 = V{}, acc1 = V{};
  int64_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    acc0 += *reinterpret_cast<const V*>(z + j);
    acc1 += *reinterpret_cast<const V*>(z + j + L);
  }
  if (j < n) acc0 += *reinterpret_cast<const V*>(z + j);
  acc0 += acc1;
  A s = 0;
  for (int64_t k = 0; k < L; ++k) s += acc0[k];
  return s;
}

// log sum_{v != e} exp(z_v) over one row, reading it once block by block (z: kBlock scratch, 64-byte aligned).
template <typename scalar_t, typename A>
A row_lse(const scalar_t* x, int64_t V, int64_t e, A* z) {
  constexpr int64_t L = fastml::kLanes<A>;
  static_assert(kBlock % (2 * L) == 0, "a block is a whole number of vector pairs");
  const A neg_inf = -std::numeric_limits<A>::infinity();
  A m = neg_inf, s = 0;
  for (int64_t lo = 0; lo < V; lo += kBlock) {
    const int64_t n = std::min(kBlock, V - lo);
    const int64_t padded = fastml::round_up(n, L);
    const scalar_t* xb = x + lo;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = static_cast<A>(xb[j]);
    for (int64_t j = n; j < padded; ++j) z[j] = neg_inf;
    if (e >= lo && e < lo + n) z[e - lo] = neg_inf;
    const A bm = block_max(z, padded);
    if (bm > m) {
      s *= std::exp(m - bm);  // m = -inf: s is 0 and stays 0
      m = bm;
    }
    if (m != neg_inf) s += block_sum_exp(z, padded, m);
  }
  return m + std::log(s);
}

// grad_v = c * exp(z_v - lse) for v != e (then the caller's corrections), written in one pass.
template <typename scalar_t, typename A>
void row_grad(const scalar_t* x, int64_t V, A lse, A c, scalar_t* out) {
  if (c == A(0)) {
    std::fill(out, out + V, static_cast<scalar_t>(0));
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) out[j] = static_cast<scalar_t>(c * fastml::exp_or_zero(static_cast<A>(x[j]) - lse));
}

// out_v = z_v + shift (a pragma cannot sit inside AT_DISPATCH's macro argument, hence a function).
template <typename scalar_t, typename A>
void row_shift(const scalar_t* x, int64_t V, A shift, scalar_t* out) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) out[j] = static_cast<scalar_t>(static_cast<A>(x[j]) + shift);
}

template <typename A, typename F>
void for_rows(int64_t N, int64_t V, const F& fn) {
  const int64_t rows = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(V, 1));
  const int64_t tasks = (N + rows - 1) / rows;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    fastml::AlignedBuffer<A> scratch(kBlock);
    for (int64_t task = begin; task < end; ++task) {
      for (int64_t r = task * rows; r < std::min(N, (task + 1) * rows); ++r) fn(r, scratch.data());
    }
  });
}

void check_logits(const at::Tensor& logits, int64_t eos_id) {
  TORCH_CHECK(logits.dim() == 3 && logits.is_floating_point(), "logits must be a floating tensor [B, T, V], got ",
              logits.scalar_type(), " ", logits.sizes());
  TORCH_CHECK(logits.size(2) >= 2, "logits need V >= 2, got ", logits.sizes());
  TORCH_CHECK(eos_id >= 0 && eos_id < logits.size(2), "eos_id must be in [0, ", logits.size(2), "), got ", eos_id);
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_bt(const at::Tensor& t, const char* name, const at::Tensor& logits, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == logits.size(1), name, " must be [B, T] = [",
              logits.size(0), ", ", logits.size(1), "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

// Checks targets and lengths (targets only where t < lengths[b]).
void check_targets(const at::Tensor& target, const at::Tensor& lengths, const at::Tensor& logits) {
  check_bt(target, "target", logits, at::kLong);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == logits.size(0) && lengths.scalar_type() == at::kLong,
              "lengths must be int64 [B], got ", lengths.scalar_type(), " ", lengths.sizes());
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto tg = target.contiguous();
  const auto ln = lengths.contiguous();
  const int64_t* tp = tg.data_ptr<int64_t>();
  const int64_t* lp = ln.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= T, "lengths[", b, "] = ", lp[b], " is out of range [0, ", T, "]");
    for (int64_t t = 0; t < lp[b]; ++t) {
      const int64_t y = tp[b * T + t];
      TORCH_CHECK(y >= 0 && y < V, "target[", b, ", ", t, "] = ", y, " is out of range [0, ", V, ")");
    }
  }
}

// log_alpha [B, T] from the eos column (and log_alpha_prev).
template <typename scalar_t, typename A>
void cumulative_log_alpha(const scalar_t* x, int64_t B, int64_t T, int64_t V, int64_t e, A log1m_eps,
                          const A* prev, A* la) {
  for (int64_t b = 0; b < B; ++b) {
    A acc = prev ? prev[b] : A(0);
    for (int64_t t = 0; t < T; ++t) {
      acc += log1m_eps + log_sigmoid(static_cast<A>(x[(b * T + t) * V + e]));
      la[b * T + t] = acc;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& logits, int64_t eos_id, double eps,
                                                       const c10::optional<at::Tensor>& log_alpha_prev) {
  check_logits(logits, eos_id);
  TORCH_CHECK(eps > 0.0 && eps < 1.0, "eps must be in (0, 1), got ", eps);
  const auto x = logits.contiguous();
  const int64_t B = x.size(0), T = x.size(1), V = x.size(2);
  const auto acc = acc_type(x);
  at::Tensor prev;
  if (log_alpha_prev.has_value()) {
    prev = log_alpha_prev->contiguous();
    TORCH_CHECK(prev.dim() == 1 && prev.size(0) == B && prev.scalar_type() == acc, "log_alpha_prev must be ", acc,
                " [B] = [", B, "], got ", prev.scalar_type(), " ", prev.sizes());
  }
  auto logp = at::empty({B, T, V}, x.options());
  auto la = at::empty({B, T}, x.options().dtype(acc));
  auto lse = at::empty({B, T}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "self_terminating_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    A* lap = la.data_ptr<A>();
    A* lsep = lse.data_ptr<A>();
    scalar_t* op = logp.data_ptr<scalar_t>();
    cumulative_log_alpha<scalar_t, A>(xp, B, T, V, eos_id, static_cast<A>(std::log1p(-eps)),
                                      prev.defined() ? prev.data_ptr<A>() : nullptr, lap);
    for_rows<A>(B * T, V, [&](int64_t r, A* scratch) {
      const scalar_t* xr = xp + r * V;
      const A l = row_lse<scalar_t, A>(xr, V, eos_id, scratch);
      lsep[r] = l;
      const A shift = lap[r] - l;
      scalar_t* o = op + r * V;
      row_shift<scalar_t, A>(xr, V, shift, o);
      o[eos_id] = static_cast<scalar_t>(log1mexp(lap[r]));
    });
  });
  return {logp, la, lse};
}

// d nll_t / d log_alpha_t: -1 for a token, d(-log(1 - alpha))/d log_alpha = 1 / expm1(-log_alpha) for eos.
template <typename A>
inline A dnll_dlog_alpha(int64_t y, int64_t e, A la) {
  return y == e ? A(1) / std::expm1(-la) : A(-1);
}

// The gradient rows: grad_v = g (exp(z_v - lse) - [v == y]) for y != e (all zero but eos for y == e), then
// grad_e = G_t sigmoid(-z_e) with G the reverse cumulative sum of g_t * d nll_t / d log_alpha_t; rows past the
// sequence's length are zero. gscale[r] is g_t (already zero past the length).
template <typename scalar_t, typename A>
void write_grad(const scalar_t* xp, const int64_t* tp, const int64_t* lp, const A* lap, const A* lsep, const A* g,
                int64_t B, int64_t T, int64_t V, int64_t e, scalar_t* gp) {
  // Serial part: G per row.
  std::vector<A> G(B * T);
  for (int64_t b = 0; b < B; ++b) {
    A acc = 0;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t r = b * T + t;
      if (t < lp[b]) acc += g[r] * dnll_dlog_alpha(tp[r], e, lap[r]);
      G[r] = acc;
    }
  }
  for_rows<A>(B * T, V, [&](int64_t r, A*) {
    const int64_t b = r / T, t = r % T;
    scalar_t* o = gp + r * V;
    const scalar_t* xr = xp + r * V;
    if (t >= lp[b]) {
      std::fill(o, o + V, static_cast<scalar_t>(0));
      return;
    }
    const int64_t y = tp[r];
    const A c = y == e ? A(0) : g[r];
    row_grad<scalar_t, A>(xr, V, lsep[r], c, o);
    if (y != e) o[y] = static_cast<scalar_t>(static_cast<A>(o[y]) - c);
    o[e] = static_cast<scalar_t>(G[r] * sigmoid_neg(static_cast<A>(xr[e])));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nll_fwd_cpu(const at::Tensor& logits,
                                                                       const at::Tensor& target,
                                                                       const at::Tensor& lengths, int64_t eos_id,
                                                                       double eps, int64_t reduction,
                                                                       bool compute_grad) {
  check_logits(logits, eos_id);
  TORCH_CHECK(eps > 0.0 && eps < 1.0, "eps must be in (0, 1), got ", eps);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction must be 0, 1 or 2, got ", reduction);
  check_targets(target, lengths, logits);
  const auto x = logits.contiguous();
  const auto tg = target.contiguous();
  const auto ln = lengths.contiguous();
  const int64_t B = x.size(0), T = x.size(1), V = x.size(2);
  const auto acc = acc_type(x);
  auto nll = at::empty({B, T}, x.options().dtype(acc));
  auto la = at::empty({B, T}, x.options().dtype(acc));
  auto lse = at::empty({B, T}, x.options().dtype(acc));
  auto grad = compute_grad ? at::empty({B, T, V}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "self_terminating_nll_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* tp = tg.data_ptr<int64_t>();
    const int64_t* lp = ln.data_ptr<int64_t>();
    A* lap = la.data_ptr<A>();
    A* lsep = lse.data_ptr<A>();
    A* np = nll.data_ptr<A>();
    cumulative_log_alpha<scalar_t, A>(xp, B, T, V, eos_id, static_cast<A>(std::log1p(-eps)), nullptr, lap);
    int64_t total = 0;
    for (int64_t b = 0; b < B; ++b) total += lp[b];
    const A scale = reduction == 1 ? A(1) / static_cast<A>(total) : A(1);
    // g_t for the fused gradient: the scale on real positions.
    std::vector<A> g(compute_grad ? B * T : 0);
    scalar_t* gp = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    for_rows<A>(B * T, V, [&](int64_t r, A* scratch) {
      const int64_t b = r / T, t = r % T;
      if (t >= lp[b]) {
        np[r] = 0;
        lsep[r] = 0;
        if (gp) {
          g[r] = 0;
          std::fill(gp + r * V, gp + (r + 1) * V, static_cast<scalar_t>(0));
        }
        return;
      }
      const scalar_t* xr = xp + r * V;
      const A l = row_lse<scalar_t, A>(xr, V, eos_id, scratch);
      lsep[r] = l;
      const int64_t y = tp[r];
      np[r] = y == eos_id ? -log1mexp(lap[r]) : -(lap[r] + static_cast<A>(xr[y]) - l);
      if (gp) {
        // The softmax part of the gradient needs no log_alpha: written now, with the row still in cache; the eos
        // column is filled in after the reverse cumulative sum.
        g[r] = scale;
        const A c = y == eos_id ? A(0) : scale;
        scalar_t* o = gp + r * V;
        row_grad<scalar_t, A>(xr, V, l, c, o);
        if (y != eos_id) o[y] = static_cast<scalar_t>(static_cast<A>(o[y]) - c);
      }
    });
    if (gp) {
      for (int64_t b = 0; b < B; ++b) {
        A acc = 0;
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t r = b * T + t;
          if (t >= lp[b]) continue;
          scalar_t* o = gp + r * V;
          acc += g[r] * dnll_dlog_alpha(tp[r], eos_id, lap[r]);
          o[eos_id] = static_cast<scalar_t>(acc * sigmoid_neg(static_cast<A>(xp[r * V + eos_id])));
        }
      }
    }
  });
  return {nll, lse, la, grad};
}

at::Tensor nll_bwd_cpu(const at::Tensor& grad_nll, const at::Tensor& logits, const at::Tensor& target,
                       const at::Tensor& lengths, const at::Tensor& lse, const at::Tensor& log_alpha,
                       int64_t eos_id) {
  check_logits(logits, eos_id);
  check_targets(target, lengths, logits);
  const auto acc = acc_type(logits);
  check_bt(grad_nll, "grad_nll", logits, acc);
  check_bt(lse, "lse", logits, acc);
  check_bt(log_alpha, "log_alpha", logits, acc);
  const auto x = logits.contiguous();
  const auto tg = target.contiguous();
  const auto ln = lengths.contiguous();
  const auto go = grad_nll.contiguous();
  const auto ls = lse.contiguous();
  const auto la = log_alpha.contiguous();
  const int64_t B = x.size(0), T = x.size(1), V = x.size(2);
  auto grad = at::empty({B, T, V}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "self_terminating_nll_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    write_grad<scalar_t, A>(x.data_ptr<scalar_t>(), tg.data_ptr<int64_t>(), ln.data_ptr<int64_t>(),
                            la.data_ptr<A>(), ls.data_ptr<A>(), go.data_ptr<A>(), B, T, V, eos_id,
                            grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastml, CPU, m) {
  m.impl("self_terminating_fwd", &fwd_cpu);
  m.impl("self_terminating_nll_fwd", &nll_fwd_cpu);
  m.impl("self_terminating_nll_bwd", &nll_bwd_cpu);
}
