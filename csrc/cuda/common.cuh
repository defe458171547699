// Pieces shared by the fastml CUDA kernels. Torch-free: plain pointers, sizes and a cudaStream_t.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace fastml_cuda {

// The accumulation type of an element type: float for the 16-bit types and float, double for double.
template <class T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <class T> using acc_t = typename Acc<T>::type;

template <class T> constexpr bool is_half_like = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <class T> __device__ __forceinline__ T from_acc(acc_t<T> x);
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }

// Feature maps by code: 0 identity, 1 elu+1 (x + 1 for x > 0, exp(x) otherwise), 2 relu; and their derivatives
// (relu' is 0 at 0 and 1 at NaN, as in torch).
template <class A> __device__ __forceinline__ A feature(A x, int code) {
  if (code == 1) return x > A(0) ? x + A(1) : exp(x);
  if (code == 2) return x < A(0) ? A(0) : x;  // NaN stays NaN, as torch.relu
  return x;
}
template <class A> __device__ __forceinline__ A feature_grad(A x, int code) {
  if (code == 1) return x > A(0) ? A(1) : exp(x);
  if (code == 2) return x <= A(0) ? A(0) : A(1);  // NaN passes the gradient, as torch's relu backward
  return A(1);
}

__host__ __device__ constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Grid limits: axis x takes up to 2^31 - 1 blocks, axes y and z only 65535. Every launch puts its batch-sized
// count (sequences x heads, examples, steps) on x and keeps y for small counts (tiles of a head dim).
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

template <class A> __device__ __forceinline__ A warp_sum(A x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// acc += op(A)[m0:m0+16, 0:K] op(B)[0:K, n0:n0+16] on tensor cores (16-bit T, wmma 16x16x16), op as in block_gemm.
template <class T, bool TA, bool TB>
__device__ __forceinline__ void mma_tile(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>& acc,
                                         const T* A, int lda, const T* B, int ldb, int K, int m0, int n0) {
  namespace w = nvcuda::wmma;
  using LA = std::conditional_t<TA, w::col_major, w::row_major>;
  using LB = std::conditional_t<TB, w::col_major, w::row_major>;
  for (int k0 = 0; k0 < K; k0 += 16) {
    w::fragment<w::matrix_a, 16, 16, 16, T, LA> a;
    w::fragment<w::matrix_b, 16, 16, 16, T, LB> b;
    w::load_matrix_sync(a, TA ? A + (int64_t)k0 * lda + m0 : A + (int64_t)m0 * lda + k0, lda);
    w::load_matrix_sync(b, TB ? B + (int64_t)n0 * ldb + k0 : B + (int64_t)k0 * ldb + n0, ldb);
    w::mma_sync(acc, a, b, acc);
  }
}

// Block-wide products of shared-memory tiles, every thread of the block taking part:
//   C[M,N] = (accumulate ? C : 0) + op(A1)[M,K1] op(B1)[K1,N] + s * op(A2)[M,K2] op(B2)[K2,N]
// where op(A)(m,k) = TA ? A[k*lda + m] : A[m*lda + k] and op(B)(k,n) = TB ? B[n*ldb + k] : B[k*ldb + n].
// 16-bit types use tensor cores (wmma 16x16x16, fp32 accumulate): M, N, K multiples of 16, leading dims multiples
// of 8 elements (4 for C), tiles 32-byte aligned. float and double use one thread per output element.
template <class T, bool TA1, bool TB1, bool TA2, bool TB2>
__device__ void block_gemm(acc_t<T>* C, int ldc, int M, int N, bool accumulate,
                           const T* A1, int lda1, const T* B1, int ldb1, int K1,
                           const T* A2, int lda2, const T* B2, int ldb2, int K2, acc_t<T> s) {
  using A = acc_t<T>;
  if constexpr (is_half_like<T>) {
    namespace w = nvcuda::wmma;
    const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    const int tn_count = N / 16, tiles = (M / 16) * tn_count;
    for (int tile = warp; tile < tiles; tile += nwarps) {
      const int m0 = tile / tn_count * 16, n0 = tile % tn_count * 16;
      w::fragment<w::accumulator, 16, 16, 16, float> acc;
      w::fill_fragment(acc, 0.0f);
      mma_tile<T, TA2, TB2>(acc, A2, lda2, B2, ldb2, K2, m0, n0);
      if (K2 > 0 && s != 1.0f) {
        for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= s;
      }
      mma_tile<T, TA1, TB1>(acc, A1, lda1, B1, ldb1, K1, m0, n0);
      float* c = C + (int64_t)m0 * ldc + n0;
      if (accumulate) {
        w::fragment<w::accumulator, 16, 16, 16, float> old;
        w::load_matrix_sync(old, c, ldc, w::mem_row_major);
        for (int i = 0; i < acc.num_elements; ++i) acc.x[i] += old.x[i];
      }
      w::store_matrix_sync(c, acc, ldc, w::mem_row_major);
    }
  } else {
    for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
      const int m = idx / N, n = idx % N;
      A x2 = A(0);
      for (int k = 0; k < K2; ++k) {
        x2 += (TA2 ? A2[k * lda2 + m] : A2[m * lda2 + k]) * (TB2 ? B2[n * ldb2 + k] : B2[k * ldb2 + n]);
      }
      A x1 = A(0);
      for (int k = 0; k < K1; ++k) {
        x1 += (TA1 ? A1[k * lda1 + m] : A1[m * lda1 + k]) * (TB1 ? B1[n * ldb1 + k] : B1[k * ldb1 + n]);
      }
      const A x = x1 + s * x2;
      C[m * ldc + n] = accumulate ? C[m * ldc + n] + x : x;
    }
  }
}

}  // namespace fastml_cuda
