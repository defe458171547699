// Causal linear attention on CUDA: the backward as three chunked scans (linear_attention_scan.cuh).
//
// With y_t = q'_t S_t, d_t = q'_t . z_t + eps and o_t = y_t / d_t, the gradients of o are dy_t = do_t / d_t and
// dd_t = -(do_t . o_t) / d_t; dd acts on z as dy acts on S, so z is S's extra value column of ones:
//   dq'_t = [dy_t, dd_t] [S_t, z_t]^T                                      (forward scan, state [S, z]^T)
//   dk'_s = [v_s, 1] G~_s^T,  G~_s = [G_s, g_s] = [dkv, dz] + sum_{t>=s} q'_t [dy_t, dd_t]   (reverse scan)
//   dv_s  = G_s^T k'_s                                                      (reverse scan, state G)
// G~_0 is the initial state's gradient. Without normalization dy = do and dd = 0.
#include "linear_attention_scan.cuh"

namespace fastml_cuda {

namespace {

template <class T> cudaError_t backward(const LinearAttentionArgs& a, cudaStream_t stream) {
  cudaError_t err = launch_scan<T, Pass::dq>(a, stream);
  if (err == cudaSuccess) err = launch_scan<T, Pass::dk>(a, stream);
  if (err == cudaSuccess) err = launch_scan<T, Pass::dv>(a, stream);
  return err;
}

}  // namespace

cudaError_t linear_attention_bwd(const LinearAttentionArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::f32: return backward<float>(a, stream);
    case DType::f16: return backward<__half>(a, stream);
    case DType::bf16: return backward<__nv_bfloat16>(a, stream);
    case DType::f64: return backward<double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastml_cuda
