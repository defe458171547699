// Registers the CUDA integrated-gradients path kernels (csrc/cuda/integrated_gradients.cu) for the fastml ops
// declared in csrc/fastml.cpp: argument checks, allocation of the results, the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cuda/binding_common.h"
#include "cuda/integrated_gradients.h"

namespace {

using at::Tensor;
using fastml_cuda::DType;
using fastml_cuda::binding::acc_dtype;
using fastml_cuda::binding::check_launch;

constexpr const char* kOp = "fastml integrated gradients (CUDA)";

DType kernel_dtype(const Tensor& t, const char* name) { return fastml_cuda::binding::kernel_dtype(t, kOp, name); }

void check_device(const Tensor& t, const char* name, const Tensor& like) {
  fastml_cuda::binding::check_device(t, kOp, name, like, "inputs");
}

// baselines as a contiguous tensor of inputs' shape and dtype (copied only when it is not one already).
Tensor expanded_baselines(const Tensor& baselines, const Tensor& inputs) {
  check_device(baselines, "baselines", inputs);
  TORCH_CHECK(baselines.dim() <= inputs.dim(), "fastml integrated gradients (CUDA): baselines of shape ",
              baselines.sizes(), " do not broadcast to inputs of shape ", inputs.sizes());
  return baselines.to(inputs.scalar_type()).expand(inputs.sizes()).contiguous();
}

// A 1-D vector of S step coefficients (alphas or weights) in the accumulation type.
Tensor step_vector(const Tensor& t, const char* name, const Tensor& like, at::ScalarType acc) {
  check_device(t, name, like);
  TORCH_CHECK(t.dim() == 1, "fastml integrated gradients (CUDA): ", name, " must be 1-D [S], got shape ",
              t.sizes());
  TORCH_CHECK(t.is_floating_point(), "fastml integrated gradients (CUDA): ", name, " must be floating, got ",
              t.scalar_type());
  return t.to(acc).contiguous();
}

Tensor ig_scale_inputs_cuda(const Tensor& inputs, const Tensor& baselines, const Tensor& alphas) {
  check_device(inputs, "inputs", inputs);
  const DType dtype = kernel_dtype(inputs, "inputs");
  TORCH_CHECK(inputs.dim() >= 1, "fastml integrated gradients (CUDA): inputs must have a batch dim");
  const c10::cuda::CUDAGuard guard(inputs.device());
  const Tensor x = inputs.contiguous();
  const Tensor xb = expanded_baselines(baselines, x);
  const Tensor a = step_vector(alphas, "alphas", x, acc_dtype(x));
  const int64_t S = a.numel(), M = x.numel();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] *= S;
  Tensor out = at::empty(shape, x.options());
  check_launch(fastml_cuda::ig_scale_inputs(dtype, x.data_ptr(), xb.data_ptr(), a.data_ptr(), out.data_ptr(), S, M,
                                            c10::cuda::getCurrentCUDAStream().stream()),
               "ig_scale_inputs");
  return out;
}

std::tuple<Tensor, Tensor> ig_accumulate_cuda(const Tensor& grads, const Tensor& inputs, const Tensor& baselines,
                                              const Tensor& weights, bool multiply_by_inputs,
                                              const std::optional<Tensor>& acc) {
  check_device(inputs, "inputs", inputs);
  check_device(grads, "grads", inputs);
  const DType dtype = kernel_dtype(grads, "grads");
  kernel_dtype(inputs, "inputs");
  TORCH_CHECK(inputs.dim() >= 1, "fastml integrated gradients (CUDA): inputs must have a batch dim");
  const c10::cuda::CUDAGuard guard(inputs.device());
  const auto ad = acc_dtype(grads);
  const Tensor w = step_vector(weights, "weights", inputs, ad);
  const int64_t S = w.numel(), B = inputs.size(0), D = B == 0 ? 0 : inputs.numel() / B;
  TORCH_CHECK(grads.dim() == inputs.dim() && grads.size(0) == S * B &&
                  grads.sizes().slice(1).equals(inputs.sizes().slice(1)),
              "fastml integrated gradients (CUDA): grads must have shape [S*B, ...] = [", S * B, ", ",
              inputs.sizes().slice(1), "], got ", grads.sizes());
  // The kernel reads inputs and baselines in grads' dtype (they share it in every IG call; converted otherwise).
  const Tensor g = grads.contiguous();
  const Tensor x = inputs.to(grads.scalar_type()).contiguous();
  const Tensor xb = expanded_baselines(baselines, x);
  Tensor a;
  if (acc.has_value()) {
    check_device(*acc, "acc", inputs);
    TORCH_CHECK(acc->sizes().equals(inputs.sizes()), "fastml integrated gradients (CUDA): acc must have inputs' shape ",
                inputs.sizes(), ", got ", acc->sizes());
    TORCH_CHECK(acc->scalar_type() == ad, "fastml integrated gradients (CUDA): acc must have dtype ", ad, ", got ",
                acc->scalar_type());
    a = acc->contiguous();
  }
  Tensor attr = at::empty(inputs.sizes(), inputs.options().dtype(ad));
  if (B == 0 || D == 0) return {attr, at::zeros({B}, attr.options())};
  // The kernel writes each example's sum in parts beside the attributions; their rows are summed in a fixed order.
  Tensor partial = at::empty({B, fastml_cuda::ig_accumulate_tiles(D)}, attr.options());
  check_launch(fastml_cuda::ig_accumulate(dtype, g.data_ptr(), x.data_ptr(), xb.data_ptr(), w.data_ptr(),
                                          a.defined() ? a.data_ptr() : nullptr, multiply_by_inputs, attr.data_ptr(),
                                          partial.data_ptr(), S, B, D, c10::cuda::getCurrentCUDAStream().stream()),
               "ig_accumulate");
  return {attr, partial.sum(1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastml, CUDA, m) {
  m.impl("ig_scale_inputs", &ig_scale_inputs_cuda);
  m.impl("ig_accumulate", &ig_accumulate_cuda);
}
