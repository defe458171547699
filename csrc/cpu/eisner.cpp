// CPU kernel of the first-order Eisner decoder, fastml::eisner (schema and semantics in
// fastml/ops/trees/schema.py, the recurrences in fastml/ops/trees/README.md).
//
// Sentences are independent: at::parallel_for over the batch, each task with its own chart reused across its
// sentences. A sentence of length L gets L x L tables in the scores' dtype, stored by diagonal: X[w * L + s] is
// the cell [s, s + w]. For one width w and one split offset k, the candidates of every start s read both operands
// contiguously in s (e.g. C_R[s, s + k] + C_L[s + k + 1, s + w] is row k at s plus row w - k - 1 at s + k + 1), so
// the maximum over splits is a running element-wise maximum over k, vectorized across the starts. A candidate
// replaces the best only when strictly greater, k ascending: the smallest split index wins ties, exactly as the
// reference's max over a dim. The sums are the reference's, operand for operand, so both backends pick the same
// cells and return the same heads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"

namespace {

// For s < m: best[s] = max over k0 <= k < k1 of a_k[s] + b_k[s] (a_k = pa(k), b_k = pb(k)), arg[s] = the smallest
// k attaining it (as a T: exact for any sentence length allowed). One vector of starts at a time, its running
// maximum and argument held in registers across the splits. The split range is cut in two halves scanned side by
// side (two independent compare-and-blend chains instead of one); the second half's winner replaces the first's
// only when strictly greater, which keeps the smallest k on ties. The last vector reads past m (the tables carry a
// vector of slack) and writes its lanes past m into best/arg, which are never used.
template <typename T, typename PA, typename PB>
inline void best_split(int64_t m, int64_t k0, int64_t k1, PA pa, PB pb, T* __restrict best, T* __restrict arg) {
  using V = fastml::Vec<T>;
  constexpr int64_t W = fastml::kLanes<T>;
  const int64_t n0 = (k1 - k0 + 1) / 2, n1 = (k1 - k0) - n0, h = k0 + n0;  // halves [k0, h), [h, k1); n1 <= n0
  auto sum = [&](int64_t k, int64_t s0) {
    return *reinterpret_cast<const V*>(pa(k) + s0) + *reinterpret_cast<const V*>(pb(k) + s0);
  };
  for (int64_t s0 = 0; s0 < m; s0 += W) {
    V b0 = sum(k0, s0), a0 = V{} + static_cast<T>(k0);
    V b1 = n1 > 0 ? sum(h, s0) : b0, a1 = V{} + static_cast<T>(h);
    int64_t j = 1;
    for (; j < n1; ++j) {
      const V v0 = sum(k0 + j, s0), v1 = sum(h + j, s0);
      const auto g0 = v0 > b0, g1 = v1 > b1;  // strictly greater: the first k attaining the maximum stays
      b0 = g0 ? v0 : b0;
      a0 = g0 ? V{} + static_cast<T>(k0 + j) : a0;
      b1 = g1 ? v1 : b1;
      a1 = g1 ? V{} + static_cast<T>(h + j) : a1;
    }
    for (; j < n0; ++j) {
      const V v0 = sum(k0 + j, s0);
      const auto g0 = v0 > b0;
      b0 = g0 ? v0 : b0;
      a0 = g0 ? V{} + static_cast<T>(k0 + j) : a0;
    }
    if (n1 > 0) {
      const auto g = b1 > b0;
      b0 = g ? b1 : b0;
      a0 = g ? a1 : a0;
    }
    *reinterpret_cast<V*>(best + s0) = b0;
    *reinterpret_cast<V*>(arg + s0) = a0;
  }
}

enum Cell : int32_t { kCR = 0, kCL = 1, kIR = 2, kIL = 3 };

// One task's working set, sized for the longest sentence n and reused for every sentence of the task.
template <typename T>
struct Chart {
  explicit Chart(int64_t n)
      : cr(n * n + kSlack), cl(n * n + kSlack), ir(n * n + kSlack), il(n * n + kSlack), bpi(n * n), bpcr(n * n),
        bpcl(n * n), best(n + kSlack), arg(n + kSlack), stack(3 * (2 * n + 2)) {
    // Lanes past the last start read cells that were never written: zero them once, so they hold numbers.
    for (T* p : {cr.data(), cl.data(), ir.data(), il.data()}) std::memset(p, 0, sizeof(T) * (n * n + kSlack));
  }
  static constexpr int64_t kSlack = 2 * fastml::kLanes<T>;
  fastml::AlignedBuffer<T> cr, cl, ir, il;         // C_R, C_L, I_R, I_L by diagonal: [w * L + s] is cell [s, s + w]
  fastml::AlignedBuffer<int32_t> bpi, bpcr, bpcl;  // the split point r of each cell, same layout
  fastml::AlignedBuffer<T> best, arg;
  // (kind, s, t) triples of the backtrack. Every non-empty complete cell pushes one incomplete cell and every
  // incomplete cell is one arc, so at most 2 (L - 1) cells are ever pushed.
  fastml::AlignedBuffer<int32_t> stack;
};

template <typename T>
void decode(const T* S, int64_t n, int64_t L, Chart<T>& c, int64_t* heads) {
  T *cr = c.cr.data(), *cl = c.cl.data(), *ir = c.ir.data(), *il = c.il.data(), *best = c.best.data(),
    *arg = c.arg.data();
  int32_t *bpi = c.bpi.data(), *bpcr = c.bpcr.data(), *bpcl = c.bpcl.data();
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t s = 0; s < L; ++s) cr[s] = cl[s] = T(0);
  for (int64_t w = 1; w < L; ++w) {
    const int64_t m = L - w, row = w * L;
    // I[s, s + w]: r = s + k, k = 0 .. w - 1, over C_R[s, s + k] + C_L[s + k + 1, s + w]
    best_split<T>(m, 0, w, [&](int64_t k) { return cr + k * L; },
                  [&](int64_t k) { return cl + (w - k - 1) * L + k + 1; }, best, arg);
    for (int64_t s = 0; s < m; ++s) {
      ir[row + s] = best[s] + S[s * n + s + w];
      il[row + s] = best[s] + S[(s + w) * n + s];
      bpi[row + s] = static_cast<int32_t>(s + static_cast<int64_t>(arg[s]));
    }
    il[row] = ninf;  // the root never has a head
    // C_R[s, s + w]: k = 1 .. w over I_R[s, s + k] + C_R[s + k, s + w]
    best_split<T>(m, 1, w + 1, [&](int64_t k) { return ir + k * L; },
                  [&](int64_t k) { return cr + (w - k) * L + k; }, best, arg);
    for (int64_t s = 0; s < m; ++s) {
      cr[row + s] = best[s];
      bpcr[row + s] = static_cast<int32_t>(s + static_cast<int64_t>(arg[s]));
    }
    // C_L[s, s + w]: k = 0 .. w - 1 over C_L[s, s + k] + I_L[s + k, s + w]
    best_split<T>(m, 0, w, [&](int64_t k) { return cl + k * L; },
                  [&](int64_t k) { return il + (w - k) * L + k; }, best, arg);
    for (int64_t s = 0; s < m; ++s) {
      cl[row + s] = best[s];
      bpcl[row + s] = static_cast<int32_t>(s + static_cast<int64_t>(arg[s]));
    }
  }
  for (int64_t d = 0; d < n; ++d) heads[d] = -1;
  int32_t* st = c.stack.data();
  int64_t top = 0;
  auto push = [&](int32_t kind, int64_t s, int64_t t) {
    if (s == t) return;
    st[top++] = kind;
    st[top++] = static_cast<int32_t>(s);
    st[top++] = static_cast<int32_t>(t);
  };
  push(kCR, 0, L - 1);
  while (top > 0) {
    const int64_t t = st[--top], s = st[--top];
    const int32_t kind = st[--top];
    const int64_t cell = (t - s) * L + s;
    if (kind == kCR) {
      const int64_t r = bpcr[cell];
      push(kIR, s, r);
      push(kCR, r, t);
    } else if (kind == kCL) {
      const int64_t r = bpcl[cell];
      push(kCL, s, r);
      push(kIL, r, t);
    } else {
      if (kind == kIR) {
        heads[t] = s;
      } else {
        heads[s] = t;
      }
      const int64_t r = bpi[cell];
      push(kCR, s, r);
      push(kCL, r + 1, t);
    }
  }
}

// Whether a sentence's scores (its L x L corner) hold a NaN or +inf: !(v < +inf) catches both (-inf is allowed).
template <typename T>
bool bad_scores(const T* S, int64_t n, int64_t L) {
  const T inf = std::numeric_limits<T>::infinity();
  int bad = 0;
  for (int64_t h = 0; h < L; ++h) {
    const T* row = S + h * n;
#pragma omp simd reduction(| : bad)
    for (int64_t d = 0; d < L; ++d) bad |= !(row[d] < inf);
  }
  return bad != 0;
}

at::Tensor eisner_cpu(const at::Tensor& scores, const at::Tensor& lengths) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "scores must be float32 or float64");
  TORCH_CHECK(scores.dim() == 3 && scores.size(1) == scores.size(2) && scores.size(1) >= 1,
              "scores must be [B, n, n] with n >= 1");
  TORCH_CHECK(scores.is_contiguous(), "scores must be contiguous");
  const int64_t B = scores.size(0), n = scores.size(1);
  TORCH_CHECK(lengths.scalar_type() == at::kLong, "lengths must be an int64 tensor");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.is_contiguous() && lengths.device().is_cpu(),
              "lengths must be a contiguous [B] CPU tensor");
  TORCH_CHECK(n < (int64_t(1) << 15), "scores: n must be below 32768");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 1 && len[b] <= n, "lengths must lie in [1, n]: lengths[", b, "] = ", len[b]);
  }
  auto heads = at::empty({B, n}, scores.options().dtype(at::kLong));
  int64_t* hp = heads.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "eisner", [&] {
    const scalar_t* sp = scores.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(!bad_scores(sp + b * n * n, n, len[b]),
                  "scores must not be NaN or +inf within a sentence's length (sentence ", b, ")");
    }
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      Chart<scalar_t> chart(n);
      for (int64_t b = b0; b < b1; ++b) decode(sp + b * n * n, n, len[b], chart, hp + b * n);
    });
  });
  return heads;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastml, CPU, m) { m.impl("eisner", &eisner_cpu); }
