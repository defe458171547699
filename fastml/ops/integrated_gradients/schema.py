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


def _check_pair(inputs, baselines):
    if inputs.dim() < 1:
        raise ValueError("fastml::ig: inputs must have a batch dimension, got a 0-d tensor")
    if not inputs.is_floating_point():
        raise TypeError(f"fastml::ig: inputs must be a floating tensor, got {inputs.dtype}")
    if baselines.shape != inputs.shape:
        raise ValueError(f"fastml::ig: baselines must have the shape of inputs {list(inputs.shape)}, got "
                         f"{list(baselines.shape)}")
    if baselines.dtype != inputs.dtype or baselines.device != inputs.device:
        raise TypeError(f"fastml::ig: baselines must have the dtype and device of inputs, got {baselines.dtype} on "
                        f"{baselines.device}")


def _check_vector(vec, name, inputs):
    if vec.dim() != 1 or not vec.is_floating_point() or vec.device != inputs.device:
        raise ValueError(f"fastml::ig: {name} must be a one-dimensional floating tensor on {inputs.device}, got "
                         f"{vec.dtype} {list(vec.shape)} on {vec.device}")


def _check_scale(inputs, baselines, alphas):
    """Argument checks of the kernel ops, so that a direct call with bad arguments is an error, never an
    out-of-bounds access (the public functions check the same, and more, first)."""
    _check_pair(inputs, baselines)
    _check_vector(alphas, "alphas", inputs)


def _check_accumulate(grads, inputs, baselines, weights, multiply_by_inputs, acc):
    _check_pair(inputs, baselines)
    _check_vector(weights, "weights", inputs)
    want = (weights.shape[0] * inputs.shape[0], *inputs.shape[1:])
    if grads.shape != want or grads.dtype != inputs.dtype or grads.device != inputs.device:
        raise ValueError(f"fastml::ig: grads must be a {inputs.dtype} tensor of shape {list(want)} on "
                         f"{inputs.device}, got {grads.dtype} {list(grads.shape)} on {grads.device}")
    dt = acc_dtype(inputs.dtype)
    if acc is not None and (acc.shape != inputs.shape or acc.dtype != dt or acc.device != inputs.device):
        raise ValueError(f"fastml::ig: acc must be a {dt} tensor of shape {list(inputs.shape)} on {inputs.device}, "
                         f"got {acc.dtype} {list(acc.shape)} on {acc.device}")


def _scale(inputs, baselines, alphas):
    return inputs.new_empty(alphas.shape[0] * inputs.shape[0], *inputs.shape[1:])


def _accumulate(grads, inputs, baselines, weights, multiply_by_inputs, acc):
    dt = acc_dtype(inputs.dtype)
    return inputs.new_empty(inputs.shape, dtype=dt), inputs.new_empty(inputs.shape[0], dtype=dt)


SCALE = OpSchema("ig_scale_inputs", "(Tensor inputs, Tensor baselines, Tensor alphas) -> Tensor", _scale,
                 check=_check_scale)
ACCUMULATE = OpSchema("ig_accumulate",
                      "(Tensor grads, Tensor inputs, Tensor baselines, Tensor weights, bool multiply_by_inputs, "
                      "Tensor? acc) -> (Tensor, Tensor)", _accumulate, check=_check_accumulate)
declare(SCALE, ACCUMULATE)
