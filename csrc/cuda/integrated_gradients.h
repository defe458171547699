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

// attr[j] = (acc[j] + sum_s weights[s] * grads[s*M + j]) * (multiply_by_inputs ? x[j] - xb[j] : 1): grads, x, xb
// in `dtype`; weights [S], acc (nullptr for zeros) and attr in the accumulation type.
cudaError_t ig_accumulate(DType dtype, const void* grads, const void* x, const void* xb, const void* weights,
                          const void* acc, bool multiply_by_inputs, void* attr, int64_t S, int64_t M,
                          cudaStream_t stream);

}  // namespace fastml_cuda
