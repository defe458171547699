// Launchers of the CUDA integrated-gradients path kernels (csrc/cuda/integrated_gradients.cu), shared with the
// torch binding. Every tensor is contiguous; M is the number of elements of one copy of the inputs ([B, ...]).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace fastml_cuda {

// out[s*M + j] = xb[j] + alphas[s] * (x[j] - xb[j]) for s < S, j < M: x, xb, out in `dtype`, alphas [S] in the
// accumulation type (float32, float64 for f64).
cudaError_t ig_scale_inputs(DType dtype, const void* x, const void* xb, const void* alphas, void* out, int64_t S,
                            int64_t M, cudaStream_t stream);

// attr[j] = (acc[j] + sum_s weights[s] * grads[s*M + j]) * (multiply_by_inputs ? x[j] - xb[j] : 1) with
// M = B * D: grads, x, xb in `dtype`; weights [S], acc (nullptr for zeros) and attr in the accumulation type.
// partial [B, ig_accumulate_tiles(D)] (accumulation type) receives each example's attribution sum in parts, in
// the same pass; summing its rows gives the per-example sums.
cudaError_t ig_accumulate(DType dtype, const void* grads, const void* x, const void* xb, const void* weights,
                          const void* acc, bool multiply_by_inputs, void* attr, void* partial, int64_t S, int64_t B,
                          int64_t D, cudaStream_t stream);

// Tiles per example of ig_accumulate, one warp each: about 1024 elements a tile, at most 256 tiles (a warp then
// walks a larger share of a big example).
inline int64_t ig_accumulate_tiles(int64_t D) {
  const int64_t tiles = (D + 1023) / 1024;
  return tiles < 1 ? 1 : tiles > 256 ? 256 : tiles;
}

}  // namespace fastml_cuda
