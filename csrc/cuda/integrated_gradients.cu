// Integrated-gradients path kernels: the scaled inputs of every step, and the weighted sum of their gradients.
// Both are memory-bound: each thread owns W consecutive elements (one 4W- to 8W-byte access when aligned), reads
// the inputs once and walks the steps; the accumulate also sums each example's attributions in the same pass.
#include "common.cuh"
#include "integrated_gradients.h"

namespace fastml_cuda {

namespace {

constexpr int kThreads = 256;

template <class T, int W> struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <class T, int W>
__global__ void __launch_bounds__(kThreads)
    ig_scale_kernel(const T* x, const T* xb, const acc_t<T>* alphas, T* out, int64_t S, int64_t M) {
  using A = acc_t<T>;
  using P = Pack<T, W>;
  const int64_t packs = M / W;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < packs; p += int64_t(gridDim.x) * blockDim.x) {
    const P a = reinterpret_cast<const P*>(x)[p];
    const P b = reinterpret_cast<const P*>(xb)[p];
    A base[W], diff[W];
#pragma unroll
    for (int i = 0; i < W; ++i) {
      base[i] = to_acc(b.v[i]);
      diff[i] = to_acc(a.v[i]) - base[i];
    }
    for (int64_t s = 0; s < S; ++s) {
      const A alpha = alphas[s];
      P r;
#pragma unroll
      for (int i = 0; i < W; ++i) r.v[i] = from_acc<T>(base[i] + alpha * diff[i]);
      reinterpret_cast<P*>(out + s * M)[p] = r;
    }
  }
}

// One warp per (example, tile) task, tiles = ig_accumulate_tiles(D): the warp walks its tile's share of example
// b's D elements (32 consecutive packs at a time, so loads coalesce) and its part of the example's sum goes to
// partial[b * tiles + tile] (reduced in a fixed order by the caller): the per-example sums come out of the same
// pass over the gradients. A warp per task keeps small examples (tabular rows) from idling whole blocks.
template <class T, int W>
__global__ void __launch_bounds__(kThreads)
    ig_accumulate_kernel(const T* grads, const T* x, const T* xb, const acc_t<T>* weights, const acc_t<T>* acc,
                         bool multiply_by_inputs, acc_t<T>* attr, acc_t<T>* partial, int64_t S, int64_t B,
                         int64_t D, int64_t tiles) {
  using A = acc_t<T>;
  using P = Pack<T, W>;
  using PA = Pack<A, W>;
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32;
  const int64_t packs = D / W;  // D % W == 0, so a pack never crosses examples and stays W-aligned
  const int64_t M = B * D;
  // The task loop depends on the warp alone, so every lane reaches warp_sum.
  for (int64_t task = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; task < B * tiles;
       task += int64_t(gridDim.x) * kWarps) {
    const int64_t b = task / tiles, tile = task % tiles, off = b * D;
    A local = A(0);
    for (int64_t p = tile * 32 + lane; p < packs; p += tiles * 32) {
      PA total;
      if (acc != nullptr) {
        total = reinterpret_cast<const PA*>(acc + off)[p];
      } else {
#pragma unroll
        for (int i = 0; i < W; ++i) total.v[i] = A(0);
      }
      for (int64_t s = 0; s < S; ++s) {
        const A w = weights[s];
        const P g = reinterpret_cast<const P*>(grads + s * M + off)[p];
#pragma unroll
        for (int i = 0; i < W; ++i) total.v[i] += w * to_acc(g.v[i]);
      }
      if (multiply_by_inputs) {
        const P a = reinterpret_cast<const P*>(x + off)[p];
        const P c = reinterpret_cast<const P*>(xb + off)[p];
#pragma unroll
        for (int i = 0; i < W; ++i) total.v[i] *= to_acc(a.v[i]) - to_acc(c.v[i]);
      }
      reinterpret_cast<PA*>(attr + off)[p] = total;
#pragma unroll
      for (int i = 0; i < W; ++i) local += total.v[i];
    }
    local = warp_sum(local);
    if (lane == 0) partial[task] = local;  // task = b * tiles + tile
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// 1-D grids (axis x) of at most 2^20 blocks: the kernels stride over any larger count of work items.
unsigned capped_grid(int64_t blocks) { return unsigned(blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20)); }
unsigned grid_for(int64_t packs) { return capped_grid((packs + kThreads - 1) / kThreads); }

// Four elements per thread when M and every pointer allow it, else one.
template <class T>
cudaError_t scale_typed(const void* x, const void* xb, const void* alphas, void* out, int64_t S, int64_t M,
                        cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int64_t vec = 4 * sizeof(T);
  const bool wide = M % 4 == 0 && aligned(x, vec) && aligned(xb, vec) && aligned(out, vec);
  const int64_t packs = wide ? M / 4 : M;
  if (packs == 0 || S == 0) return cudaSuccess;
  const T* xt = static_cast<const T*>(x);
  const T* bt = static_cast<const T*>(xb);
  const A* at = static_cast<const A*>(alphas);
  T* ot = static_cast<T*>(out);
  if (wide) {
    ig_scale_kernel<T, 4><<<grid_for(packs), kThreads, 0, stream>>>(xt, bt, at, ot, S, M);
  } else {
    ig_scale_kernel<T, 1><<<grid_for(packs), kThreads, 0, stream>>>(xt, bt, at, ot, S, M);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t accumulate_typed(const void* grads, const void* x, const void* xb, const void* weights, const void* acc,
                             bool multiply_by_inputs, void* attr, void* partial, int64_t S, int64_t B, int64_t D,
                             cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int64_t vec = 4 * sizeof(T), vec_acc = 4 * sizeof(A);
  if (B == 0 || D == 0) return cudaSuccess;
  const bool wide = D % 4 == 0 && aligned(grads, vec) && aligned(x, vec) && aligned(xb, vec) &&
                    aligned(attr, vec_acc) && (acc == nullptr || aligned(acc, vec_acc));
  const int64_t tiles = ig_accumulate_tiles(D);
  const unsigned grid = capped_grid((B * tiles + kThreads / 32 - 1) / (kThreads / 32));
  const T* gt = static_cast<const T*>(grads);
  const T* xt = static_cast<const T*>(x);
  const T* bt = static_cast<const T*>(xb);
  const A* wt = static_cast<const A*>(weights);
  const A* ct = static_cast<const A*>(acc);
  A* rt = static_cast<A*>(attr);
  A* pt = static_cast<A*>(partial);
  if (wide) {
    ig_accumulate_kernel<T, 4>
        <<<grid, kThreads, 0, stream>>>(gt, xt, bt, wt, ct, multiply_by_inputs, rt, pt, S, B, D, tiles);
  } else {
    ig_accumulate_kernel<T, 1>
        <<<grid, kThreads, 0, stream>>>(gt, xt, bt, wt, ct, multiply_by_inputs, rt, pt, S, B, D, tiles);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t ig_scale_inputs(DType dtype, const void* x, const void* xb, const void* alphas, void* out, int64_t S,
                            int64_t M, cudaStream_t stream) {
  switch (dtype) {
    case DType::f32: return scale_typed<float>(x, xb, alphas, out, S, M, stream);
    case DType::f16: return scale_typed<__half>(x, xb, alphas, out, S, M, stream);
    case DType::bf16: return scale_typed<__nv_bfloat16>(x, xb, alphas, out, S, M, stream);
    case DType::f64: return scale_typed<double>(x, xb, alphas, out, S, M, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ig_accumulate(DType dtype, const void* grads, const void* x, const void* xb, const void* weights,
                          const void* acc, bool multiply_by_inputs, void* attr, void* partial, int64_t S, int64_t B,
                          int64_t D, cudaStream_t stream) {
  switch (dtype) {
    case DType::f32:
      return accumulate_typed<float>(grads, x, xb, weights, acc, multiply_by_inputs, attr, partial, S, B, D, stream);
    case DType::f16:
      return accumulate_typed<__half>(grads, x, xb, weights, acc, multiply_by_inputs, attr, partial, S, B, D, stream);
    case DType::bf16:
      return accumulate_typed<__nv_bfloat16>(grads, x, xb, weights, acc, multiply_by_inputs, attr, partial, S, B, D,
                                             stream);
    case DType::f64:
      return accumulate_typed<double>(grads, x, xb, weights, acc, multiply_by_inputs, attr, partial, S, B, D, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastml_cuda
