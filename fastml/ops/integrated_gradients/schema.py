"""The path kernels of integrated gradients, declared once for the C++ kernels (fastml::ig_*) and their Triton
twins (fastml::ig_*_triton).

- ig_scale_inputs(inputs [B, ...], baselines (inputs' shape, may be an expanded view), alphas [S]) -> [S*B, ...]:
  out[s*B + b] = baselines[b] + alphas[s] * (inputs[b] - baselines[b]), step-major as Captum.
- ig_accumulate(grads [S*B, ...], inputs, baselines, weights [S], multiply_by_inputs, acc [B, ...] or None) ->
  (attr [B, ...], sums [B]) with total[b] = acc[b] + sum_s weights[s] * grads[s*B + b] accumulated in the
  accumulation dtype, attr = total * (inputs - baselines) if multiply_by_inputs else total, and sums the
  per-example totals of attr (for the convergence delta).
"""
from fastml._library import OpSchema, declare
from fastml._numerics import acc_dtype


def _scale(inputs, baselines, alphas):
    return inputs.new_empty(alphas.shape[0] * inputs.shape[0], *inputs.shape[1:])


def _accumulate(grads, inputs, baselines, weights, multiply_by_inputs, acc):
    dt = acc_dtype(inputs.dtype)
    return inputs.new_empty(inputs.shape, dtype=dt), inputs.new_empty(inputs.shape[0], dtype=dt)


SCALE = OpSchema("ig_scale_inputs", "(Tensor inputs, Tensor baselines, Tensor alphas) -> Tensor", _scale)
ACCUMULATE = OpSchema("ig_accumulate",
                      "(Tensor grads, Tensor inputs, Tensor baselines, Tensor weights, bool multiply_by_inputs, "
                      "Tensor? acc) -> (Tensor, Tensor)", _accumulate)
declare(SCALE, ACCUMULATE)
