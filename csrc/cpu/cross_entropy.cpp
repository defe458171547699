// CPU kernels of logit-adjusted cross-entropy, fastml::logit_adjusted_ce_{fwd,bwd} (schemas and semantics in
// fastml/ops/cross_entropy/schema.py).
//
// z = logits + bias (bias = tau * log_prior, added as each element is loaded). One pass over each row: the row
// is read from memory once, in blocks that stay in L1, keeping a running maximum and a running sum of exp(z - max)
// (rescaled when the maximum grows), and, when the gradient is wanted, written right after from the cache
// (the row, up to a few hundred KB, is still in L2). Rows are independent: tasks of whole rows run in parallel,
// and per-task partial sums of the loss are added in a fixed order (deterministic for any thread count).
// Small C (a row shorter than a few vectors) takes a tile of many rows at once and runs its element-wise work
// (the bias, the exponentials, the gradient) as flat vector loops over the tile, with only the per-row
// reductions done row by row. Half types are read and written in their dtype and computed in float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using fastml::AlignedBuffer;

constexpr int64_t kNone = 0, kMean = 1;
constexpr int64_t kSmallC = 64;        // C up to this: the tiled small-C path
constexpr int64_t kTileElems = 4096;   // logits in one small-C tile (16 KB of float scratch per array)
constexpr int64_t kBlock = 512;        // elements per step of the online maximum / sum over a long row
constexpr int64_t kTaskElems = 32768;  // rows are grouped into tasks of about this many logits

template <typename A>
struct Params {
  const A* bias;           // [C] or nullptr
  const A* weight;         // [C] or nullptr
  const int64_t* target;   // [N]
  int64_t C;
  int64_t ignore_index;
  A eps;                   // label smoothing
  A wsum;                  // sum of the class weights (C without weights)

  A wt(int64_t t) const { return weight ? weight[t] : A(1); }
  bool ignored(int64_t t) const { return t == ignore_index; }
  // Coefficients of a row's gradient at scale sc (grad_output, over the denominator for "mean"):
  // grad_j = cp * p_j - cs * w_j - ct * [j == t].
  void coefficients(A sc, A wt, A& cp, A& cs, A& ct) const {
    cp = sc * ((A(1) - eps) * wt + eps / A(C) * wsum);
    cs = sc * eps / A(C);
    ct = sc * (A(1) - eps) * wt;
  }
  // The row's loss from its log-sum-exp, target logit and sum_j w_j z_j (used only with smoothing).
  A loss(A lse, A zt, A sz, A wt) const {
    A l = (A(1) - eps) * wt * (lse - zt);
    if (eps > A(0)) l += eps / A(C) * (wsum * lse - sz);
    return l;
  }
};

// z = x + bias for n elements, in the accumulation type.
template <typename scalar_t, typename A>
inline void load_z(const scalar_t* x, const A* bias, int64_t n, A* z) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = static_cast<A>(x[j]) + bias[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = static_cast<A>(x[j]);
  }
}

template <typename A>
struct RowStats {
  A m, s, sz;  // max_j z_j, sum_j exp(z_j - m), sum_j w_j z_j (with smoothing)
};

// One read of a long row: block by block (each block in L1), the running max and the running sum of exponentials.
// With keep (e, mb not null): also keeps e_j = exp(z_j - m_b) in e and m_b in mb[b], m_b being the running max
// after block b, so that the gradient needs no second exponential (p_j = e_j exp(m_b - m) / s).
template <typename scalar_t, typename A>
RowStats<A> row_stats(const scalar_t* x, const Params<A>& p, A* z, A* e = nullptr, A* mb = nullptr) {
  const A neg_inf = -std::numeric_limits<A>::infinity();
  A m = neg_inf, s = 0, sz = 0;
  const bool smooth = p.eps > A(0);
  for (int64_t lo = 0, blk = 0; lo < p.C; lo += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, p.C - lo);
    load_z(x + lo, p.bias ? p.bias + lo : nullptr, n, z);
    A bm = neg_inf;
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < n; ++j) bm = z[j] > bm ? z[j] : bm;
    if (bm > m) {
      s *= std::exp(m - bm);  // m = -inf: exp gives 0 and s is 0 anyway
      m = bm;
    }
    if (m != neg_inf) {
      A bs = 0;
      if (e != nullptr) {
        A* eb = e + lo;
#pragma omp simd reduction(+ : bs)
        for (int64_t j = 0; j < n; ++j) {
          const A v = fastml::exp_or_zero(z[j] - m);
          eb[j] = v;
          bs += v;
        }
      } else {
#pragma omp simd reduction(+ : bs)
        for (int64_t j = 0; j < n; ++j) bs += fastml::exp_or_zero(z[j] - m);
      }
      s += bs;
    } else if (e != nullptr) {
      std::fill(e + lo, e + lo + n, A(0));
    }
    if (mb != nullptr) mb[blk] = m;
    if (smooth) {
      A bz = 0;
      if (p.weight != nullptr) {
        const A* w = p.weight + lo;
#pragma omp simd reduction(+ : bz)
        for (int64_t j = 0; j < n; ++j) bz += w[j] * z[j];
      } else {
#pragma omp simd reduction(+ : bz)
        for (int64_t j = 0; j < n; ++j) bz += z[j];
      }
      sz += bz;
    }
  }
  return {m, s, sz};
}

// The gradient of a long row from the exponentials row_stats kept: grad_j = cp / s * exp(m_b - m) e_j - cs * w_j,
// then the target's element, computed afresh. e may be out itself (float and double rows).
template <typename scalar_t, typename A>
void row_grad_kept(const scalar_t* x, const Params<A>& p, int64_t t, const RowStats<A>& st, const A* mb, A cp, A cs,
                   A ct, const A* e, scalar_t* out) {
  const A neg_inf = -std::numeric_limits<A>::infinity();
  for (int64_t lo = 0, blk = 0; lo < p.C; lo += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, p.C - lo);
    const A f = mb[blk] == neg_inf ? A(0) : cp / st.s * std::exp(mb[blk] - st.m);
    const A* eb = e + lo;
    scalar_t* o = out + lo;
    if (p.weight != nullptr) {
      const A* w = p.weight + lo;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(f * eb[j] - cs * w[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(f * eb[j] - cs);
    }
  }
  const A zt = static_cast<A>(x[t]) + (p.bias ? p.bias[t] : A(0));
  out[t] = static_cast<scalar_t>(cp / st.s * fastml::exp_or_zero(zt - st.m) - cs * p.wt(t) - ct);
}

// Writes grad_j = cp * exp(z_j - m) - cs * w_j for a long row, then the target's element with its own term.
template <typename scalar_t, typename A>
void row_grad(const scalar_t* x, const Params<A>& p, int64_t t, A m, A cp, A cs, A ct, A* z, scalar_t* out) {
  for (int64_t lo = 0; lo < p.C; lo += kBlock) {
    const int64_t n = std::min(kBlock, p.C - lo);
    load_z(x + lo, p.bias ? p.bias + lo : nullptr, n, z);
    scalar_t* o = out + lo;
    if (p.weight != nullptr) {
      const A* w = p.weight + lo;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(cp * fastml::exp_or_zero(z[j] - m) - cs * w[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(cp * fastml::exp_or_zero(z[j] - m) - cs);
    }
  }
  const A zt = static_cast<A>(x[t]) + (p.bias ? p.bias[t] : A(0));
  out[t] = static_cast<scalar_t>(cp * fastml::exp_or_zero(zt - m) - cs * p.wt(t) - ct);
}

// Per-thread scratch of the small-C path.
template <typename A>
struct TileScratch {
  AlignedBuffer<A> z, e, a, b;
  TileScratch() : z(kTileElems), e(kTileElems), a(kTileElems), b(kTileElems) {}
};

// A tile of R rows of small C (R * C <= kTileElems). fwd: computes lse and the loss of each row (loss_out[r],
// 0 for ignored rows); bwd: reads lse. With grad_out: writes the rows' gradients, row r at scale sc[r].
// btile / wtile are the bias / weights repeated R times (wtile all ones without weights).
template <typename scalar_t, typename A>
void small_tile(const scalar_t* x, int64_t r0, int64_t R, const Params<A>& p, const A* btile, const A* wtile,
                bool fwd, A* lse, A* loss_out, const A* sc, A sc_all, scalar_t* grad_out, TileScratch<A>& s) {
  const int64_t C = p.C, n = R * C;
  A* z = s.z.data();
  A* e = s.e.data();
  A* a = s.a.data();
  A* b = s.b.data();
  load_z(x, btile, n, z);
  // The value each row's exponentials are taken against: its max (fwd) or its lse (bwd), broadcast into a.
  A rowv[kTileElems];
  for (int64_t r = 0; r < R; ++r) {
    const A* zr = z + r * C;
    A v;
    if (fwd) {
      v = zr[0];
      for (int64_t j = 1; j < C; ++j) v = zr[j] > v ? zr[j] : v;
    } else {
      v = p.ignored(p.target[r0 + r]) ? A(0) : lse[r0 + r];
    }
    rowv[r] = v;
    A* ar = a + r * C;
    for (int64_t j = 0; j < C; ++j) ar[j] = v;
  }
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) e[k] = fastml::exp_or_zero(z[k] - a[k]);
  // Per row: in the forward the sum, lse and loss; the gradient's coefficients, broadcast into a and b.
  const bool smooth = p.eps > A(0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = p.target[r0 + r];
    const A* er = e + r * C;
    A inv = 1;
    if (fwd) {
      A sum = 0;
      for (int64_t j = 0; j < C; ++j) sum += er[j];
      const A l = rowv[r] + std::log(sum);
      lse[r0 + r] = l;
      inv = A(1) / sum;
      if (p.ignored(t)) {
        loss_out[r] = 0;
      } else {
        A sz = 0;
        if (smooth) {
          const A* zr = z + r * C;
          for (int64_t j = 0; j < C; ++j) sz += wtile[j] * zr[j];
        }
        loss_out[r] = p.loss(l, z[r * C + t], sz, p.wt(t));
      }
    }
    if (grad_out != nullptr) {
      A cp = 0, cs = 0, ct = 0;
      if (!p.ignored(t)) p.coefficients(sc ? sc[r0 + r] : sc_all, p.wt(t), cp, cs, ct);
      cp *= inv;
      A* ar = a + r * C;
      A* br = b + r * C;
      for (int64_t j = 0; j < C; ++j) {
        ar[j] = cp;
        br[j] = cs;
      }
    }
  }
  if (grad_out == nullptr) return;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) z[k] = a[k] * e[k] - b[k] * wtile[k];
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = p.target[r0 + r];
    A* zr = z + r * C;
    if (p.ignored(t)) {
      std::fill(zr, zr + C, A(0));  // no NaN from an ignored row's values
    } else {
      A cp, cs, ct;
      p.coefficients(sc ? sc[r0 + r] : sc_all, p.wt(t), cp, cs, ct);
      zr[t] -= ct;
    }
  }
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) grad_out[k] = static_cast<scalar_t>(z[k]);
}

void check_args(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& bias,
                const c10::optional<at::Tensor>& weight, int64_t reduction, double eps) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, C], got shape ", logits.sizes());
  TORCH_CHECK(logits.is_floating_point(), "logits must be a floating tensor, got ", logits.scalar_type());
  TORCH_CHECK(logits.size(1) >= 1, "logits must have at least one class, got shape ", logits.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "target must be [N] = [", logits.size(0),
              "], got shape ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64, got ", target.scalar_type());
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* v : {&bias, &weight}) {
    if (v->has_value()) {
      TORCH_CHECK((*v)->dim() == 1 && (*v)->size(0) == logits.size(1), "bias and weight must be [C] = [",
                  logits.size(1), "], got shape ", (*v)->sizes());
      TORCH_CHECK((*v)->scalar_type() == acc, "bias and weight must have dtype ", acc, ", got ",
                  (*v)->scalar_type());
    }
  }
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK(eps >= 0.0 && eps <= 1.0, "label_smoothing must be in [0, 1], got ", eps);
}

template <typename A>
Params<A> make_params(const at::Tensor& t, const at::Tensor& b, const at::Tensor& w, int64_t C, int64_t ignore_index,
                      double eps) {
  Params<A> p;
  p.bias = b.defined() ? b.data_ptr<A>() : nullptr;
  p.weight = w.defined() ? w.data_ptr<A>() : nullptr;
  p.target = t.data_ptr<int64_t>();
  p.C = C;
  p.ignore_index = ignore_index;
  p.eps = static_cast<A>(eps);
  A ws = 0;
  if (p.weight != nullptr) {
    for (int64_t j = 0; j < C; ++j) ws += p.weight[j];
  } else {
    ws = static_cast<A>(C);
  }
  p.wsum = ws;
  return p;
}

// Checks every target and returns the denominator of "mean": the sum of the targets' weights over the rows that
// are not ignored (their count without weights).
template <typename A>
A mean_denominator(const Params<A>& p, int64_t N) {
  A d = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = p.target[i];
    if (p.ignored(t)) continue;
    TORCH_CHECK(t >= 0 && t < p.C, "target[", i, "] = ", t, " is out of range: class ids are in [0, ", p.C,
                ") or ignore_index (", p.ignore_index, ")");
    d += p.wt(t);
  }
  return d;
}

// The small-C tiles' repeated bias and weights (weights all ones without weights).
template <typename A>
void make_tiles(const Params<A>& p, int64_t R, std::vector<A>& btile, std::vector<A>& wtile) {
  const int64_t C = p.C;
  wtile.resize(R * C);
  if (p.bias != nullptr) btile.resize(R * C);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t j = 0; j < C; ++j) {
      wtile[r * C + j] = p.wt(j);
      if (p.bias != nullptr) btile[r * C + j] = p.bias[j];
    }
  }
}

// Runs fn(task, row_begin, row_end) over groups of rows in parallel; returns the number of tasks.
template <typename F>
int64_t for_row_groups(int64_t N, int64_t rows_per_task, const F& fn) {
  const int64_t tasks = (N + rows_per_task - 1) / rows_per_task;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      fn(task, task * rows_per_task, std::min(N, (task + 1) * rows_per_task));
    }
  });
  return tasks;
}

int64_t small_rows(int64_t C) { return std::max<int64_t>(1, kTileElems / C); }
int64_t long_rows(int64_t C) { return std::max<int64_t>(1, kTaskElems / C); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> logit_adjusted_ce_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& weight, int64_t ignore_index, int64_t reduction, double label_smoothing,
    bool compute_grad) {
  check_args(logits, target, bias, weight, reduction, label_smoothing);
  const auto x = logits.contiguous();
  const auto t = target.contiguous();
  const auto b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = reduction == kNone ? at::empty({N}, x.options()) : at::empty({}, x.options());
  auto lse = at::empty({N}, x.options().dtype(acc));
  auto grad = compute_grad ? at::empty({N, C}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "logit_adjusted_ce_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const Params<A> p = make_params<A>(t, b, w, C, ignore_index, label_smoothing);
    const A denom = mean_denominator(p, N);
    const A gscale = reduction == kMean ? A(1) / denom : A(1);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    A* lsep = lse.data_ptr<A>();
    scalar_t* gp = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    std::vector<A> rows(reduction == kNone ? N : 0);
    A* rowp = rows.data();
    const bool small = C <= kSmallC;
    const int64_t per = small ? small_rows(C) : long_rows(C);
    std::vector<A> partial((N + per - 1) / per, A(0));
    std::vector<A> btile, wtile;
    if (small) make_tiles(p, per, btile, wtile);
    for_row_groups(N, per, [&](int64_t task, int64_t r0, int64_t r1) {
      A sum = 0;
      if (small) {
        thread_local std::unique_ptr<TileScratch<A>> scratch;
        if (!scratch) scratch.reset(new TileScratch<A>());
        A losses[kTileElems];
        small_tile<scalar_t, A>(xp + r0 * C, r0, r1 - r0, p, btile.empty() ? nullptr : btile.data(), wtile.data(),
                                true, lsep, losses, nullptr, gscale, gp ? gp + r0 * C : nullptr, *scratch);
        for (int64_t r = r0; r < r1; ++r) {
          sum += losses[r - r0];
          if (rowp) rowp[r] = losses[r - r0];
        }
      } else {
        A z[kBlock];
        // The kept exponentials: the gradient row itself for float and double, a float row for half types.
        thread_local std::vector<A> e_scratch, mb_scratch;
        if (gp != nullptr) {
          if (!std::is_same<scalar_t, A>::value && static_cast<int64_t>(e_scratch.size()) < C) e_scratch.resize(C);
          if (static_cast<int64_t>(mb_scratch.size()) < C / kBlock + 1) mb_scratch.resize(C / kBlock + 1);
        }
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = xp + r * C;
          const int64_t tr = p.target[r];
          A l = 0;
          if (p.ignored(tr)) {
            lsep[r] = 0;
            if (gp) std::fill(gp + r * C, gp + (r + 1) * C, scalar_t(0));
          } else {
            A* e = nullptr;
            if (gp != nullptr) {
              e = std::is_same<scalar_t, A>::value ? reinterpret_cast<A*>(gp + r * C) : e_scratch.data();
            }
            const RowStats<A> st = row_stats<scalar_t, A>(xr, p, z, e, gp ? mb_scratch.data() : nullptr);
            const A lse_r = st.m + std::log(st.s);
            lsep[r] = lse_r;
            const A wt = p.wt(tr);
            l = p.loss(lse_r, static_cast<A>(xr[tr]) + (p.bias ? p.bias[tr] : A(0)), st.sz, wt);
            if (gp) {
              A cp, cs, ct;
              p.coefficients(gscale, wt, cp, cs, ct);
              row_grad_kept<scalar_t, A>(xr, p, tr, st, mb_scratch.data(), cp, cs, ct, e, gp + r * C);
            }
          }
          sum += l;
          if (rowp) rowp[r] = l;
        }
      }
      partial[task] = sum;
    });
    if (reduction == kNone) {
      scalar_t* lp = loss.data_ptr<scalar_t>();
      for (int64_t i = 0; i < N; ++i) lp[i] = static_cast<scalar_t>(rowp[i]);
    } else {
      A total = 0;
      for (const A v : partial) total += v;
      // "mean" of no rows (all ignored) is 0 / 0 = NaN, as in PyTorch.
      loss.fill_(static_cast<double>(reduction == kMean ? total / denom : total));
    }
  });
  return {loss, lse, grad};
}

at::Tensor logit_adjusted_ce_bwd_cpu(const at::Tensor& grad_output, const at::Tensor& logits,
                                     const at::Tensor& target, const c10::optional<at::Tensor>& bias,
                                     const c10::optional<at::Tensor>& weight, const at::Tensor& lse,
                                     int64_t ignore_index, int64_t reduction, double label_smoothing) {
  check_args(logits, target, bias, weight, reduction, label_smoothing);
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N && lse.scalar_type() == acc, "lse must be a [", N, "] ", acc,
              " tensor, got ", lse.scalar_type(), " ", lse.sizes());
  if (reduction == kNone) {
    TORCH_CHECK(grad_output.dim() == 1 && grad_output.size(0) == N, "grad_output must be [N] = [", N,
                "] for reduction 'none', got shape ", grad_output.sizes());
  } else {
    TORCH_CHECK(grad_output.numel() == 1, "grad_output must hold one value for a reduced loss, got shape ",
                grad_output.sizes());
  }
  const auto x = logits.contiguous();
  const auto t = target.contiguous();
  const auto b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const auto g = grad_output.to(acc).contiguous();
  const auto l = lse.contiguous();
  auto grad = at::empty({N, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "logit_adjusted_ce_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const Params<A> p = make_params<A>(t, b, w, C, ignore_index, label_smoothing);
    const A denom = mean_denominator(p, N);
    const A* gop = g.data_ptr<A>();
    const A* sc = reduction == kNone ? gop : nullptr;
    const A sc_all = reduction == kNone ? A(0) : (reduction == kMean ? gop[0] / denom : gop[0]);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    A* lsep = const_cast<A*>(l.data_ptr<A>());
    scalar_t* gp = grad.data_ptr<scalar_t>();
    const bool small = C <= kSmallC;
    const int64_t per = small ? small_rows(C) : long_rows(C);
    std::vector<A> btile, wtile;
    if (small) make_tiles(p, per, btile, wtile);
    for_row_groups(N, per, [&](int64_t task, int64_t r0, int64_t r1) {
      if (small) {
        thread_local std::unique_ptr<TileScratch<A>> scratch;
        if (!scratch) scratch.reset(new TileScratch<A>());
        small_tile<scalar_t, A>(xp + r0 * C, r0, r1 - r0, p, btile.empty() ? nullptr : btile.data(), wtile.data(),
                                false, lsep, nullptr, sc, sc_all, gp + r0 * C, *scratch);
        return;
      }
      A z[kBlock];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t tr = p.target[r];
        if (p.ignored(tr)) {
          std::fill(gp + r * C, gp + (r + 1) * C, scalar_t(0));
          continue;
        }
        A cp, cs, ct;
        p.coefficients(sc ? sc[r] : sc_all, p.wt(tr), cp, cs, ct);
        row_grad<scalar_t, A>(xp + r * C, p, tr, lsep[r], cp, cs, ct, z, gp + r * C);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastml, CPU, m) {
  m.impl("logit_adjusted_ce_fwd", &logit_adjusted_ce_fwd_cpu);
  m.impl("logit_adjusted_ce_bwd", &logit_adjusted_ce_bwd_cpu);
}
