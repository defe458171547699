// Registers the CUDA causal-linear-attention kernels (csrc/cuda/linear_attention_*.cu) for the fastml ops declared
// in csrc/fastml.cpp: argument checks, allocation of the results, the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/linear_attention.h"

namespace {

using at::Tensor;
using fastml_cuda::DType;
using fastml_cuda::LinearAttentionArgs;

DType kernel_dtype(const Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble,
              "fastml linear attention (CUDA): q must be float32, float16, bfloat16 or float64, got ", s);
  return s == at::kFloat ? DType::f32 : s == at::kHalf ? DType::f16 : s == at::kBFloat16 ? DType::bf16 : DType::f64;
}

void check_tensor(const Tensor& t, const char* name, const Tensor& q, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda(), "fastml linear attention (CUDA): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == q.device(), "fastml linear attention (CUDA): ", name, " is on ", t.device(),
              " but q is on ", q.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fastml linear attention (CUDA): ", name, " must have dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), "fastml linear attention (CUDA): ", name, " must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastml linear attention (CUDA): ", name, " must be contiguous");
}

const void* optional_ptr(const std::optional<Tensor>& t, const char* name, const Tensor& q, at::ScalarType dtype,
                         at::IntArrayRef shape) {
  if (!t.has_value()) return nullptr;
  check_tensor(*t, name, q, dtype, shape);
  return t->data_ptr();
}

at::ScalarType state_dtype(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Checks q, k, v [B,H,T,K|V] and cu_seqlens, and fills the sizes and options shared by the forward and backward.
LinearAttentionArgs sequence_args(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const std::optional<Tensor>& cu_seqlens, int64_t feature_map, bool normalize,
                                  double eps, double scale) {
  LinearAttentionArgs a{};
  a.dtype = kernel_dtype(q);
  TORCH_CHECK(q.dim() == 4, "fastml linear attention (CUDA): q must be 4-D [B, H, T, K], got ", q.sizes());
  TORCH_CHECK(v.dim() == 4, "fastml linear attention (CUDA): v must be 4-D [B, H, T, V], got ", v.sizes());
  a.B = q.size(0);
  a.H = q.size(1);
  a.T = q.size(2);
  a.K = q.size(3);
  a.V = v.size(3);
  check_tensor(q, "q", q, q.scalar_type(), q.sizes());
  check_tensor(k, "k", q, q.scalar_type(), q.sizes());
  check_tensor(v, "v", q, q.scalar_type(), {a.B, a.H, a.T, a.V});
  TORCH_CHECK(a.K <= fastml_cuda::kMaxHeadDim && a.V <= fastml_cuda::kMaxHeadDim,
              "fastml linear attention (CUDA): head dims K and V must be at most ", fastml_cuda::kMaxHeadDim,
              ", got K = ", a.K, ", V = ", a.V);
  TORCH_CHECK(feature_map >= 0 && feature_map <= 2,
              "fastml linear attention (CUDA): feature_map must be 0, 1 or 2, got ", feature_map);
  a.N = a.B;
  a.cu_seqlens = nullptr;
  if (cu_seqlens.has_value()) {
    const Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1,
                "fastml linear attention (CUDA): cu_seqlens must be 1-D [N+1], got ", cu.sizes());
    check_tensor(cu, "cu_seqlens", q, at::kLong, cu.sizes());
    TORCH_CHECK(a.B == 1, "fastml linear attention (CUDA): cu_seqlens needs B = 1, got B = ", a.B);
    a.N = cu.numel() - 1;
    a.cu_seqlens = cu.data_ptr<int64_t>();
  }
  a.feature_map = int(feature_map);
  a.normalize = normalize;
  a.eps = eps;
  a.scale = scale;
  return a;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastml::", op, " (CUDA) failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_attention_fwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& kv0,
    const std::optional<Tensor>& z0, const std::optional<Tensor>& cu_seqlens, int64_t feature_map, bool normalize,
    double eps, double scale) {
  LinearAttentionArgs a = sequence_args(q, k, v, cu_seqlens, feature_map, normalize, eps, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto sd = state_dtype(q);
  a.kv0 = optional_ptr(kv0, "kv0", q, sd, {a.N, a.H, a.K, a.V});
  a.z0 = optional_ptr(z0, "z0", q, sd, {a.N, a.H, a.K});
  const auto so = q.options().dtype(sd);
  Tensor o = at::empty({a.B, a.H, a.T, a.V}, v.options());
  Tensor kv = at::empty({a.N, a.H, a.K, a.V}, so);
  Tensor z = at::empty({a.N, a.H, a.K}, so);
  Tensor den = at::empty({a.B, a.H, a.T}, so);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out_o = o.data_ptr();
  a.out_kv = kv.data_ptr();
  a.out_z = z.data_ptr();
  a.out_den = den.data_ptr();
  check_launch(fastml_cuda::linear_attention_fwd(a, c10::cuda::getCurrentCUDAStream().stream()),
               "linear_attention_fwd");
  return {o, kv, z, den};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_attention_bwd_cuda(
    const Tensor& grad_o, const std::optional<Tensor>& grad_kv, const std::optional<Tensor>& grad_z,
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& den,
    const std::optional<Tensor>& kv0, const std::optional<Tensor>& z0, const std::optional<Tensor>& cu_seqlens,
    int64_t feature_map, bool normalize, double eps, double scale) {
  LinearAttentionArgs a = sequence_args(q, k, v, cu_seqlens, feature_map, normalize, eps, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto sd = state_dtype(q);
  check_tensor(grad_o, "grad_o", q, q.scalar_type(), v.sizes());
  check_tensor(o, "o", q, q.scalar_type(), v.sizes());
  check_tensor(den, "den", q, sd, {a.B, a.H, a.T});
  a.kv0 = optional_ptr(kv0, "kv0", q, sd, {a.N, a.H, a.K, a.V});
  a.z0 = optional_ptr(z0, "z0", q, sd, {a.N, a.H, a.K});
  a.grad_kv = optional_ptr(grad_kv, "grad_kv", q, sd, {a.N, a.H, a.K, a.V});
  a.grad_z = optional_ptr(grad_z, "grad_z", q, sd, {a.N, a.H, a.K});
  const auto so = q.options().dtype(sd);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  Tensor dkv0 = at::empty({a.N, a.H, a.K, a.V}, so);
  Tensor dz0 = at::empty({a.N, a.H, a.K}, so);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.o = o.data_ptr();
  a.den = den.data_ptr();
  a.grad_o = grad_o.data_ptr();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.dkv0 = dkv0.data_ptr();
  a.dz0 = dz0.data_ptr();
  check_launch(fastml_cuda::linear_attention_bwd(a, c10::cuda::getCurrentCUDAStream().stream()),
               "linear_attention_bwd");
  return {dq, dk, dv, dkv0, dz0};
}

std::tuple<Tensor, Tensor, Tensor> linear_attention_step_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                              const Tensor& kv, const Tensor& z, int64_t feature_map,
                                                              bool normalize, double eps, double scale) {
  LinearAttentionArgs a{};
  a.dtype = kernel_dtype(q);
  TORCH_CHECK(q.dim() == 3, "fastml linear attention step (CUDA): q must be 3-D [B, H, K], got ", q.sizes());
  TORCH_CHECK(v.dim() == 3, "fastml linear attention step (CUDA): v must be 3-D [B, H, V], got ", v.sizes());
  a.B = q.size(0);
  a.H = q.size(1);
  a.K = q.size(2);
  a.V = v.size(2);
  a.T = 1;
  a.N = a.B;
  check_tensor(q, "q", q, q.scalar_type(), q.sizes());
  check_tensor(k, "k", q, q.scalar_type(), q.sizes());
  check_tensor(v, "v", q, q.scalar_type(), {a.B, a.H, a.V});
  TORCH_CHECK(a.K <= fastml_cuda::kMaxHeadDim && a.V <= fastml_cuda::kMaxHeadDim,
              "fastml linear attention step (CUDA): head dims K and V must be at most ", fastml_cuda::kMaxHeadDim,
              ", got K = ", a.K, ", V = ", a.V);
  TORCH_CHECK(feature_map >= 0 && feature_map <= 2,
              "fastml linear attention step (CUDA): feature_map must be 0, 1 or 2, got ", feature_map);
  const auto sd = state_dtype(q);
  check_tensor(kv, "kv", q, sd, {a.B, a.H, a.K, a.V});
  check_tensor(z, "z", q, sd, {a.B, a.H, a.K});
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor o = at::empty({a.B, a.H, a.V}, v.options());
  Tensor kv1 = at::empty(kv.sizes(), kv.options());
  Tensor z1 = at::empty(z.sizes(), z.options());
  a.feature_map = int(feature_map);
  a.normalize = normalize;
  a.eps = eps;
  a.scale = scale;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.kv0 = kv.data_ptr();
  a.z0 = z.data_ptr();
  a.out_o = o.data_ptr();
  a.out_kv = kv1.data_ptr();
  a.out_z = z1.data_ptr();
  check_launch(fastml_cuda::linear_attention_step(a, c10::cuda::getCurrentCUDAStream().stream()),
               "linear_attention_step");
  return {o, kv1, z1};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastml, CUDA, m) {
  m.impl("linear_attention_fwd", &linear_attention_fwd_cuda);
  m.impl("linear_attention_bwd", &linear_attention_bwd_cuda);
  m.impl("linear_attention_step", &linear_attention_step_cuda);
}
