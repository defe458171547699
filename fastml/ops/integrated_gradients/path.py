"""The fused path kernels ig_scale_inputs and ig_accumulate: validation and backend dispatch.

Backends: `reference` (reference.py); `cpp` (csrc/cpu/integrated_gradients.cpp) and `cuda`
(csrc/cuda/integrated_gradients.cu) are the CPU and CUDA kernels of the torch ops fastml::ig_scale_inputs /
fastml::ig_accumulate; `triton` runs their twins fastml::ig_*_triton (kernels/integrated_gradients.py). The ops
are declared in schema.py.
"""
import torch

from fastml import _backend
from fastml._numerics import acc_dtype
from fastml.ops.integrated_gradients import reference, schema  # noqa: F401  (schema declares the kernel ops)
from fastml.ops.integrated_gradients._validate import check_broadcast

SCALE_OP = "ig_scale_inputs"
ACCUMULATE_OP = "ig_accumulate"


def _register():
    ops = torch.ops.fastml
    table = ((SCALE_OP, reference.ig_scale_inputs, ops.ig_scale_inputs, ops.ig_scale_inputs_triton),
             (ACCUMULATE_OP, reference.ig_accumulate, ops.ig_accumulate, ops.ig_accumulate_triton))
    for op, ref, kernel, twin in table:
        _backend.register(op, _backend.Backend("reference", ref))
        # cpp and cuda are the CPU and CUDA kernels of the same C++ op (the dispatcher picks by device).
        _backend.register(op, _backend.Backend("cpp", kernel))
        _backend.register(op, _backend.Backend("cuda", kernel))
        _backend.register(op, _backend.Backend("triton", twin))


_register()


def _check_tensor(t, name, *, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")


def _check_pair(inputs, baselines):
    """Validates inputs [B, ...] and baselines (broadcastable to inputs); returns baselines expanded to inputs."""
    _check_tensor(inputs, "inputs")
    _check_tensor(baselines, "baselines")
    if inputs.dim() < 1:
        raise ValueError("inputs must have a batch dimension, got a 0-d tensor")
    check_broadcast(baselines, inputs, "baselines", "inputs")
    if baselines.dtype != inputs.dtype:
        raise TypeError(f"baselines must have the dtype of inputs ({inputs.dtype}), got {baselines.dtype}")
    return baselines.expand(inputs.shape)


def _check_vector(v, name, device):
    _check_tensor(v, name)
    if v.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional [S], got shape {list(v.shape)}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but inputs are on {device}")


def ig_scale_inputs(inputs, baselines, alphas, *, backend="auto"):
    """The points of the straight path at which IG evaluates gradients, step-major as Captum.

    inputs: [B, ...] floating; baselines: broadcastable to inputs, same dtype and device; alphas: [S].
    Returns [S*B, ...] in the inputs' dtype: out[s*B + b] = baselines[b] + alphas[s] * (inputs[b] - baselines[b]).
    """
    baselines = _check_pair(inputs, baselines)
    _check_vector(alphas, "alphas", inputs.device)
    run = _backend.select(SCALE_OP, _backend.Call(inputs.device, inputs.dtype), backend).impl
    return run(inputs, baselines, alphas)


def ig_accumulate(grads, inputs, baselines, weights, *, multiply_by_inputs=True, return_sums=False, acc=None,
                  backend="auto"):
    """Contracts the steps of the path gradients with the quadrature weights.

    grads: [S*B, ...] (step-major, the gradients at ig_scale_inputs' points), inputs [B, ...], baselines
    broadcastable to inputs, weights [S]; acc: None or [B, ...] in the accumulation dtype, a running sum of
    earlier chunks of steps. With total[b] = acc[b] + sum_s weights[s] * grads[s*B + b]:
    attributions = total * (inputs - baselines) if multiply_by_inputs else total, float32 (float64 for float64
    inputs). return_sums=True also returns their per-example sums [B] (for the convergence delta).
    """
    baselines = _check_pair(inputs, baselines)
    _check_tensor(grads, "grads")
    _check_vector(weights, "weights", inputs.device)
    S, B = weights.shape[0], inputs.shape[0]
    if grads.shape != (S * B, *inputs.shape[1:]):
        raise ValueError(f"grads must have shape [S*B, ...] = {[S * B, *inputs.shape[1:]]}, got {list(grads.shape)}")
    if grads.dtype != inputs.dtype or grads.device != inputs.device:
        raise TypeError(f"grads must have the dtype and device of inputs, got {grads.dtype} on {grads.device}")
    dt = acc_dtype(inputs.dtype)
    if acc is not None:
        _check_tensor(acc, "acc")
        if acc.shape != inputs.shape or acc.dtype != dt or acc.device != inputs.device:
            raise ValueError(f"acc must be a {dt} tensor of shape {list(inputs.shape)} on {inputs.device}, got "
                             f"{acc.dtype} {list(acc.shape)} on {acc.device}")
    run = _backend.select(ACCUMULATE_OP, _backend.Call(inputs.device, inputs.dtype), backend).impl
    attr, sums = run(grads, inputs, baselines, weights, bool(multiply_by_inputs), acc)
    return (attr, sums) if return_sums else attr
