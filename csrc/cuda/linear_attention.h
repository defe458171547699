// Launchers of the CUDA causal-linear-attention kernels (csrc/cuda/linear_attention_*.cu), shared with the torch
// binding. Torch-free: the binding checks the arguments, allocates the results and passes raw pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace fastml_cuda {

// Every tensor is contiguous. q,k [B,H,T,K], v,o,grad_o [B,H,T,V] in `dtype`; den [B,H,T], states kv [N,H,K,V] and
// z [N,H,K] in the state dtype (float32, float64 for f64). cu_seqlens [N+1] int64 or nullptr (then N = B); with
// cu_seqlens, B = 1. Optional inputs are nullptr when absent (zeros). K and V are at most kMaxHeadDim.
constexpr int64_t kMaxHeadDim = 256;

struct LinearAttentionArgs {
  DType dtype;
  int64_t B, H, T, K, V, N;
  const int64_t* cu_seqlens;
  int feature_map;
  bool normalize;
  double eps, scale;
  // Inputs.
  const void* q;
  const void* k;
  const void* v;
  const void* kv0;
  const void* z0;
  // Backward inputs: the forward's o and den, the gradients of o and of the final state.
  const void* o;
  const void* den;
  const void* grad_o;
  const void* grad_kv;
  const void* grad_z;
  // Forward outputs: o, kv, z, den. Backward outputs: dq, dk, dv, dkv0, dz0.
  void* out_o;
  void* out_kv;
  void* out_z;
  void* out_den;
  void* dq;
  void* dk;
  void* dv;
  void* dkv0;
  void* dz0;
};

// Each returns cudaSuccess or the error of the launch (or of raising the shared-memory limit).
cudaError_t linear_attention_fwd(const LinearAttentionArgs& a, cudaStream_t stream);
cudaError_t linear_attention_bwd(const LinearAttentionArgs& a, cudaStream_t stream);

// One decode step: q,k [B,H,K], v [B,H,V], kv0 [B,H,K,V], z0 [B,H,K] (T and N unused, N = B); writes out_o
// [B,H,V], out_kv, out_z.
cudaError_t linear_attention_step(const LinearAttentionArgs& a, cudaStream_t stream);

}  // namespace fastml_cuda
