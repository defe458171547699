// Registers the CUDA causal-linear-attention kernels (csrc/cuda/linear_attention_*.cu) for the fastml ops declared
// in csrc/fastml.cpp: argument checks, allocation of the results, the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cuda/binding_common.h"
#include "cuda/linear_attention.h"

namespace {

using at::Tensor;
using fastml_cuda::LinearAttentionArgs;
using fastml_cuda::binding::check_launch;

constexpr const char* kOp = "fastml linear attention (CUDA)";

at::ScalarType state_dtype(const Tensor& q) { return fastml_cuda::binding::acc_dtype(q); }

void check_tensor(const Tensor& t, const char* name, const Tensor& q, at::ScalarType dtype, at::IntArrayRef shape) {
  fastml_cuda::binding::check_device(t, kOp, name, q, "q");
  TORCH_CHECK(t.scalar_type() == dtype, kOp, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), kOp, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

const void* optional_ptr(const std::optional<Tensor>& t, const char* name, const Tensor& q, at::ScalarType dtype,
                         at::IntArrayRef shape) {
  if (!t.has_value()) return nullptr;
  check_tensor(*t, name, q, dtype, shape);
  return t->data_ptr();
}

// Checks q, k [..., K] and v [..., V] (the sequence ops: [B, H, T, *], 4-D; the step: [B, H, *], 3-D) and the
// options, and fills dtype, B, H, K, V (T = 1 for the step), N = B and the options.
LinearAttentionArgs head_args(const Tensor& q, const Tensor& k, const Tensor& v, int64_t dim, const char* layout,
                              int64_t feature_map, bool normalize, double eps, double scale) {
  LinearAttentionArgs a{};
  a.dtype = fastml_cuda::binding::kernel_dtype(q, kOp, "q");
  TORCH_CHECK(q.dim() == dim, kOp, ": q must be ", dim, "-D ", layout, " with K last, got ", q.sizes());
  TORCH_CHECK(v.dim() == dim, kOp, ": v must be ", dim, "-D ", layout, " with V last, got ", v.sizes());
  a.B = q.size(0);
  a.H = q.size(1);
  a.T = dim == 4 ? q.size(2) : 1;
  a.K = q.size(-1);
  a.V = v.size(-1);
  a.N = a.B;
  check_tensor(q, "q", q, q.scalar_type(), q.sizes());
  check_tensor(k, "k", q, q.scalar_type(), q.sizes());
  std::vector<int64_t> vshape(q.sizes().begin(), q.sizes().end());
  vshape.back() = a.V;
  check_tensor(v, "v", q, q.scalar_type(), vshape);
  TORCH_CHECK(a.K <= fastml_cuda::kMaxHeadDim && a.V <= fastml_cuda::kMaxHeadDim, kOp,
              ": head dims K and V must be at most ", fastml_cuda::kMaxHeadDim, ", got K = ", a.K, ", V = ", a.V);
  TORCH_CHECK(feature_map >= 0 && feature_map <= 2, kOp, ": feature_map must be 0, 1 or 2, got ", feature_map);
  a.feature_map = int(feature_map);
  a.normalize = normalize;
  a.eps = eps;
  a.scale = scale;
  return a;
}

// head_args for q, k, v [B,H,T,K|V], and cu_seqlens: its layout on the host, its values on the device (the kernels
// clamp each segment to [0, T] besides, so a bad value is an error, never an access out of bounds).
LinearAttentionArgs sequence_args(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const std::optional<Tensor>& cu_seqlens, int64_t feature_map, bool normalize,
                                  double eps, double scale) {
  LinearAttentionArgs a = head_args(q, k, v, 4, "[B, H, T, *]", feature_map, normalize, eps, scale);
  a.cu_seqlens = nullptr;
  if (cu_seqlens.has_value()) {
    const Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, kOp, ": cu_seqlens must be 1-D [N+1], got ", cu.sizes());
    check_tensor(cu, "cu_seqlens", q, at::kLong, cu.sizes());
    TORCH_CHECK(a.B == 1, kOp, ": cu_seqlens needs B = 1, got B = ", a.B);
    fastml_cuda::binding::assert_cu_seqlens(cu, a.T, kOp);
    a.N = cu.numel() - 1;
    a.cu_seqlens = cu.data_ptr<int64_t>();
  }
  return a;
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
  LinearAttentionArgs a = head_args(q, k, v, 3, "[B, H, *]", feature_map, normalize, eps, scale);
  const auto sd = state_dtype(q);
  check_tensor(kv, "kv", q, sd, {a.B, a.H, a.K, a.V});
  check_tensor(z, "z", q, sd, {a.B, a.H, a.K});
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor o = at::empty({a.B, a.H, a.V}, v.options());
  Tensor kv1 = at::empty(kv.sizes(), kv.options());
  Tensor z1 = at::empty(z.sizes(), z.options());
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
