// Building blocks of the CPU causal-linear-attention kernels (csrc/cpu/linear_attention.cpp, whose header
// comment explains the design): the register-tiled state scan, and the row conversions around it. A header
// rather than a second .cpp, so that the extension keeps one translation unit per op (each costs ~30 s to build).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace fastml {
namespace la_cpu {

// Tokens converted and scanned at a time: a block's rows of q', k', v and the outputs (4 x 64 x 256 B for
// K = V = 64 in float32) stay in L1/L2 across the passes over the block.
constexpr int64_t kBlockT = 64;
// Rows of M held in registers per pass: 16 tiles + 3 working vectors fit in 32 vector registers (AVX-512, NEON);
// 8 in 16 (AVX2, SSE).
constexpr int kRowTile = kVecRegs >= 32 ? 16 : 8;
constexpr int kRowStep = 8;  // state dims are padded to multiples of this (and of a vector)

enum : int64_t { kIdentity = 0, kEluPlusOne = 1, kRelu = 2 };

template <typename T, int R>
void scan_block(T* __restrict M, int64_t ldm, const T* __restrict a, const T* __restrict c, int64_t lda,
                const T* __restrict b, T* __restrict out, int64_t ldb, int64_t n, bool reverse, bool accumulate) {
  using V = Vec<T>;
  V m[R];
  for (int i = 0; i < R; ++i) m[i] = *reinterpret_cast<const V*>(M + i * ldm);
  const int64_t step = reverse ? -1 : 1;
  int64_t t = reverse ? n - 1 : 0;
  for (int64_t s = 0; s < n; ++s, t += step) {
    const T* at = a + t * lda;
    const T* ct = c + t * lda;
    const V bt = *reinterpret_cast<const V*>(b + t * ldb);
    // Two accumulators halve the chain of dependent multiply-adds into out_t.
    V acc0 = {};
    V acc1 = {};
#pragma GCC unroll 16
    for (int i = 0; i < R; i += 2) {
      m[i] += at[i] * bt;
      acc0 += ct[i] * m[i];
      m[i + 1] += at[i + 1] * bt;
      acc1 += ct[i + 1] * m[i + 1];
    }
    V* o = reinterpret_cast<V*>(out + t * ldb);
    *o = accumulate ? *o + acc0 + acc1 : acc0 + acc1;
  }
  for (int i = 0; i < R; ++i) *reinterpret_cast<V*>(M + i * ldm) = m[i];
}

// The recurrence over n tokens for columns [j0, j1) of the state M [rows x cols] (row-major): a and c have token
// stride rows, b and out token stride cols; rows is a multiple of kRowStep, cols, j0 and j1 of a vector. Columns
// of M never mix, so a column range is a complete scan of its own: out's columns [j0, j1) are overwritten (the
// first row tile writes them, the others add to them) and nothing else is touched.
template <typename T>
void scan(T* M, const T* a, const T* c, int64_t rows, const T* b, T* out, int64_t cols, int64_t n, bool reverse,
          int64_t j0, int64_t j1) {
  int64_t r = 0;
  for (; r + kRowTile <= rows; r += kRowTile) {
    for (int64_t j = j0; j < j1; j += kLanes<T>) {
      scan_block<T, kRowTile>(M + r * cols + j, cols, a + r, c + r, rows, b + j, out + j, cols, n, reverse, r > 0);
    }
  }
  for (; r < rows; r += kRowStep) {
    for (int64_t j = j0; j < j1; j += kLanes<T>) {
      scan_block<T, kRowStep>(M + r * cols + j, cols, a + r, c + r, rows, b + j, out + j, cols, n, reverse, r > 0);
    }
  }
}

// M += sum_t a_t^T b_t over n tokens, with a [n, rows] (token stride rows) and b [n, cols]: the state update of
// scan without its output, for the segment sums of the segment-parallel path. R rows x two vectors of M stay in
// registers (2R accumulators), so that each broadcast of a_t[i] feeds two multiply-adds.
template <typename T, int R, int W>
void accumulate_block(T* __restrict M, int64_t ldm, const T* __restrict a, int64_t lda, const T* __restrict b,
                      int64_t ldb, int64_t n) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  V m[R][W];
  for (int i = 0; i < R; ++i) {
    for (int w = 0; w < W; ++w) m[i][w] = *reinterpret_cast<const V*>(M + i * ldm + w * L);
  }
  for (int64_t t = 0; t < n; ++t) {
    const T* at = a + t * lda;
    V bt[W];
    for (int w = 0; w < W; ++w) bt[w] = *reinterpret_cast<const V*>(b + t * ldb + w * L);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const T ai = at[i];
      for (int w = 0; w < W; ++w) m[i][w] += ai * bt[w];
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int w = 0; w < W; ++w) *reinterpret_cast<V*>(M + i * ldm + w * L) = m[i][w];
  }
}

// Rows [r, rows) of M with W vectors per row tile: tiles of R rows, then the 8- or 4-row remainder.
template <typename T, int R, int W>
void accumulate_rows(T* M, const T* a, int64_t rows, const T* b, int64_t cols, int64_t j, int64_t n) {
  int64_t r = 0;
  for (; r + R <= rows; r += R) accumulate_block<T, R, W>(M + r * cols + j, cols, a + r, rows, b + j, cols, n);
  for (; r + 4 <= rows; r += 4) accumulate_block<T, 4, W>(M + r * cols + j, cols, a + r, rows, b + j, cols, n);
  for (; r < rows; r += 2) accumulate_block<T, 2, W>(M + r * cols + j, cols, a + r, rows, b + j, cols, n);
}

template <typename T>
void accumulate(T* M, const T* a, int64_t rows, const T* b, int64_t cols, int64_t n) {
  constexpr int64_t L = kLanes<T>;
  int64_t j = 0;
  if constexpr (kVecRegs >= 32) {
    // 6 rows x 4 vectors: 24 accumulators, 4 loads of b_t and one broadcast per token fit the 32 registers; each
    // token costs 24 multiply-adds for 10 loads.
    for (; j + 4 * L <= cols; j += 4 * L) accumulate_rows<T, 6, 4>(M, a, rows, b, cols, j, n);
  }
  for (; j + 2 * L <= cols; j += 2 * L) accumulate_rows<T, kRowTile / 2, 2>(M, a, rows, b, cols, j, n);
  for (; j < cols; j += L) accumulate_rows<T, kRowStep, 1>(M, a, rows, b, cols, j, n);
}

// Per-thread scratch of at least n elements, 64-byte aligned, kept for the thread's lifetime and grown when a
// call needs more: a kernel call takes its working set from here instead of allocating (and page-faulting in)
// fresh memory every time. One live use per thread and Slot at a time (each parallel body takes slot 0 once; the
// calling thread may hold slot 1 for buffers its parallel regions share).
template <typename T, int Slot = 0>
T* thread_scratch(int64_t n) {
  struct Holder {
    void* p = nullptr;
    size_t bytes = 0;
    ~Holder() { std::free(p); }
  };
  thread_local Holder h;
  const size_t need = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T)), 64));
  if (need > h.bytes) {
    std::free(h.p);
    h.p = std::aligned_alloc(64, need);
    h.bytes = h.p != nullptr ? need : 0;
    TORCH_CHECK(h.p != nullptr, "fastml: out of memory allocating ", need, " bytes of scratch");
  }
  return static_cast<T*>(h.p);
}

// z += k_t, then d[t] = q_t . z + eps, for n tokens whose rows have ld elements (a multiple of the vector width):
// the normalizer's running sum, with z in registers across the tokens when it fits in NV <= 8 vectors.
template <typename T, int NV>
void running_dots_fixed(T* z, const T* k, const T* q, int64_t ld, int64_t n, T* d, T eps) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  V zr[NV];
  for (int j = 0; j < NV; ++j) zr[j] = *reinterpret_cast<const V*>(z + j * L);
  for (int64_t t = 0; t < n; ++t) {
    V acc = {};
    for (int j = 0; j < NV; ++j) {
      zr[j] += *reinterpret_cast<const V*>(k + t * ld + j * L);
      acc += *reinterpret_cast<const V*>(q + t * ld + j * L) * zr[j];
    }
    T sum = 0;
    for (int64_t l = 0; l < L; ++l) sum += acc[l];
    d[t] = sum + eps;
  }
  for (int j = 0; j < NV; ++j) *reinterpret_cast<V*>(z + j * L) = zr[j];
}

template <typename T>
void running_dots(T* z, const T* k, const T* q, int64_t ld, int64_t n, T* d, T eps) {
  switch (ld / kLanes<T>) {
    case 1: return running_dots_fixed<T, 1>(z, k, q, ld, n, d, eps);
    case 2: return running_dots_fixed<T, 2>(z, k, q, ld, n, d, eps);
    case 3: return running_dots_fixed<T, 3>(z, k, q, ld, n, d, eps);
    case 4: return running_dots_fixed<T, 4>(z, k, q, ld, n, d, eps);
    case 5: return running_dots_fixed<T, 5>(z, k, q, ld, n, d, eps);
    case 6: return running_dots_fixed<T, 6>(z, k, q, ld, n, d, eps);
    case 7: return running_dots_fixed<T, 7>(z, k, q, ld, n, d, eps);
    case 8: return running_dots_fixed<T, 8>(z, k, q, ld, n, d, eps);
    default:
      for (int64_t t = 0; t < n; ++t) {
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < ld; ++i) {
          z[i] += k[t * ld + i];
          dot += q[t * ld + i] * z[i];
        }
        d[t] = dot + eps;
      }
  }
}

// dst [n, ld] = mul * phi(src [n, d]) in the compute type, zero in the padding columns d..ld.
template <typename acc_t, typename scalar_t, typename F>
void map_rows(const scalar_t* src, int64_t n, int64_t d, acc_t* dst, int64_t ld, F f) {
  for (int64_t t = 0; t < n; ++t) {
    const scalar_t* s = src + t * d;
    acc_t* o = dst + t * ld;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] = f(static_cast<acc_t>(s[i]));
    std::fill(o + d, o + ld, acc_t(0));
  }
}

template <typename acc_t, typename scalar_t>
void load_rows(const scalar_t* src, int64_t n, int64_t d, acc_t* dst, int64_t ld, int64_t fm, acc_t mul) {
  switch (fm) {
    case kEluPlusOne:
      map_rows(src, n, d, dst, ld, [mul](acc_t x) { return mul * (x > 0 ? x + acc_t(1) : exp_nonpositive(x)); });
      break;
    case kRelu:  // written so that NaN passes through, as in torch.relu
      map_rows(src, n, d, dst, ld, [mul](acc_t x) { return mul * (x < 0 ? acc_t(0) : x); });
      break;
    default:
      map_rows(src, n, d, dst, ld, [mul](acc_t x) { return mul * x; });
  }
}

// out = mul * g * phi'(x) in the input dtype, for one row of d elements: the chain rule from a gradient w.r.t.
// the mapped q' or k' to one w.r.t. the raw input.
template <typename acc_t, typename scalar_t>
void store_input_grad(const acc_t* g, const scalar_t* x, scalar_t* out, int64_t d, int64_t fm, acc_t mul) {
  switch (fm) {
    case kEluPlusOne:
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const acc_t xi = static_cast<acc_t>(x[i]);
        out[i] = static_cast<scalar_t>(mul * g[i] * (xi > 0 ? acc_t(1) : exp_nonpositive(xi)));
      }
      break;
    case kRelu:  // as torch's relu backward: the gradient passes wherever x <= 0 is false, NaN included
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) <= 0 ? acc_t(0) : mul * g[i]);
      }
      break;
    default:
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) out[i] = static_cast<scalar_t>(mul * g[i]);
  }
}

// Rows [n, d] of src as the kernels read them (mul * phi(x), row stride ld): src itself when that is already
// so (float32/float64, identity map, no scaling, no padding), else converted into scratch.
template <typename acc_t, typename scalar_t>
bool reads_in_place(int64_t d, int64_t ld, int64_t fm, acc_t mul) {
  return std::is_same_v<acc_t, scalar_t> && d == ld && fm == kIdentity && mul == acc_t(1);
}

template <typename acc_t, typename scalar_t>
const acc_t* rows_view(const scalar_t* src, int64_t n, int64_t d, acc_t* scratch, int64_t ld, int64_t fm, acc_t mul) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (reads_in_place<acc_t, scalar_t>(d, ld, fm, mul)) return src;
  }
  load_rows(src, n, d, scratch, ld, fm, mul);
  return scratch;
}

// Where a scan's output rows [n, d] go: straight into the output tensor when no conversion or normalization
// follows (same condition as rows_view), else into scratch for an epilogue.
template <typename acc_t, typename scalar_t>
acc_t* output_rows(scalar_t* dst, int64_t d, acc_t* scratch, int64_t ld, bool epilogue) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (d == ld && !epilogue) return dst;
  }
  return scratch;
}

// Unit u's state [rows x cols] of the per-unit states at base (or zeros if base is null) into the padded M with
// row stride ld, transposed if asked; M has `size` elements, the padding is zero.
template <typename acc_t>
void load_state(const acc_t* base, int64_t u, int64_t rows, int64_t cols, acc_t* M, int64_t ld, int64_t size,
                bool transpose) {
  std::fill(M, M + size, acc_t(0));
  if (base == nullptr) return;
  const acc_t* src = base + u * rows * cols;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      if (transpose) {
        M[j * ld + i] = src[i * cols + j];
      } else {
        M[i * ld + j] = src[i * cols + j];
      }
    }
  }
}

// Unit u's vector of n elements at base (or zeros if base is null) into dst [size], zero beyond n.
template <typename acc_t>
void load_vector(const acc_t* base, int64_t u, int64_t n, acc_t* dst, int64_t size) {
  std::fill(dst, dst + size, acc_t(0));
  if (base != nullptr) std::copy(base + u * n, base + (u + 1) * n, dst);
}

// Columns [j0, min(j1, cols)) of the padded M (row stride cols_p) into dst [rows x cols]; all of them by default.
template <typename acc_t>
void store_state(const acc_t* M, int64_t cols_p, acc_t* dst, int64_t rows, int64_t cols, int64_t j0 = 0,
                 int64_t j1 = INT64_MAX) {
  const int64_t e = std::min(j1, cols);
  if (j0 >= e) return;
  for (int64_t i = 0; i < rows; ++i) std::copy(M + i * cols_p + j0, M + i * cols_p + e, dst + i * cols + j0);
}

}  // namespace la_cpu
}  // namespace fastml
