// Helpers shared by the torch bindings of the CUDA kernels (csrc/cuda/*_binding.cpp): the kernels' element type
// of a tensor, device and layout checks, launch errors, and the device-side check of cu_seqlens. Each takes the
// prefix of its error messages (`op`, e.g. "fastml linear attention (CUDA)"), so that an error names the op and
// the argument at fault. Host code only; the .cu files never include it (they stay torch-free).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <string>

#include "cuda/dtype.h"

namespace fastml_cuda {
namespace binding {

// The launchers' DType for a float32, float16, bfloat16 or float64 tensor; any other dtype is an error.
inline DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", s);
  return s == at::kFloat ? DType::f32 : s == at::kHalf ? DType::f16 : s == at::kBFloat16 ? DType::bf16 : DType::f64;
}

// The accumulation (and state) dtype for inputs like t: float64 for float64, float32 otherwise.
inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// t is a CUDA tensor on like's device.
inline void check_device(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like,
                         const char* like_name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device());
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastml::", op, " (CUDA) failed: ", cudaGetErrorString(err));
}

// The values of cu_seqlens [N+1] (int64, on the device): 0 first, non-decreasing, T last. Checked on the device
// with torch ops and torch's asynchronous assert, so no host sync: a bad tensor fails at the next synchronizing
// call with a device-side assert. The kernels clamp every segment to [0, T] meanwhile, so a bad value can never
// make them read or write outside the tensors. Runs in the binding, hence also under torch.compile, which treats
// the op as opaque and skips the Python-side checks of the values.
inline void assert_cu_seqlens(const at::Tensor& cu, int64_t T, const char* op) {
  const int64_t n = cu.numel();
  if (n == 0) return;
  at::Tensor ok = cu.select(0, 0).eq(0).logical_and(cu.select(0, n - 1).eq(T));
  if (n > 1) ok = ok.logical_and(cu.diff().ge(0).all());
  const std::string msg = std::string(op) + ": cu_seqlens must start at 0, be non-decreasing and end at T = " +
                          std::to_string(T);
  at::_assert_async(ok, msg);
}

}  // namespace binding
}  // namespace fastml_cuda
