// Causal linear attention on CUDA: the chunked forward (linear_attention_scan.cuh) and the decode step.
#include "linear_attention_scan.cuh"

namespace fastml_cuda {

namespace {

constexpr int kStepThreads = 256;

// One block per (batch, head): kv' = kv + k' v^T, z' = z + k', o = q' kv' / (q' . z' + eps).
template <class T> __global__ void __launch_bounds__(kStepThreads) la_step_kernel(const LinearAttentionArgs a) {
  using A = acc_t<T>;
  __shared__ A qs[kMaxHeadDim];
  __shared__ A ks[kMaxHeadDim];
  __shared__ A partial[kStepThreads / 32];
  const int64_t K = a.K, V = a.V, bh = blockIdx.x;
  const T* q = static_cast<const T*>(a.q) + bh * K;
  const T* k = static_cast<const T*>(a.k) + bh * K;
  const T* v = static_cast<const T*>(a.v) + bh * V;
  const A* kv0 = static_cast<const A*>(a.kv0) + bh * K * V;
  const A* z0 = static_cast<const A*>(a.z0) + bh * K;
  A* kv1 = static_cast<A*>(a.out_kv) + bh * K * V;
  A* z1 = static_cast<A*>(a.out_z) + bh * K;
  T* o = static_cast<T*>(a.out_o) + bh * V;

  A part = A(0);
  for (int i = threadIdx.x; i < K; i += blockDim.x) {
    const A qi = A(a.scale) * feature(to_acc(q[i]), a.feature_map);
    const A ki = feature(to_acc(k[i]), a.feature_map);
    const A zi = z0[i] + ki;
    qs[i] = qi;
    ks[i] = ki;
    z1[i] = zi;
    part += qi * zi;
  }
  part = warp_sum(part);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = part;
  __syncthreads();
  A den = A(a.eps);
  for (int w = 0; w < int(blockDim.x / 32); ++w) den += partial[w];

  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const A vj = to_acc(v[j]);
    A acc = A(0);
    for (int64_t i = 0; i < K; ++i) {
      const A s = kv0[i * V + j] + ks[i] * vj;
      kv1[i * V + j] = s;
      acc += qs[i] * s;
    }
    o[j] = from_acc<T>(a.normalize ? acc / den : acc);
  }
}

}  // namespace

cudaError_t linear_attention_fwd(const LinearAttentionArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::f32: return launch_scan<float, Pass::fwd>(a, stream);
    case DType::f16: return launch_scan<__half, Pass::fwd>(a, stream);
    case DType::bf16: return launch_scan<__nv_bfloat16, Pass::fwd>(a, stream);
    case DType::f64: return launch_scan<double, Pass::fwd>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t linear_attention_step(const LinearAttentionArgs& a, cudaStream_t stream) {
  if (a.B * a.H == 0) return cudaSuccess;
  if (a.B * a.H > kMaxGridX) return cudaErrorInvalidConfiguration;
  const dim3 grid(unsigned(a.B * a.H));  // one block per (batch, head), on axis x
  switch (a.dtype) {
    case DType::f32: la_step_kernel<float><<<grid, kStepThreads, 0, stream>>>(a); break;
    case DType::f16: la_step_kernel<__half><<<grid, kStepThreads, 0, stream>>>(a); break;
    case DType::bf16: la_step_kernel<__nv_bfloat16><<<grid, kStepThreads, 0, stream>>>(a); break;
    case DType::f64: la_step_kernel<double><<<grid, kStepThreads, 0, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fastml_cuda
