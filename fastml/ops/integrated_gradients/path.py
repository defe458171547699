"""The fused path kernels ig_scale_inputs and ig_accumulate: validation and backend dispatch.

Backends: `reference` (reference.py); `cpp` (csrc/cpu/integrated_gradients.cpp) and `cuda` behind the torch ops
fastml::ig_scale_inputs / fastml::ig_accumulate (one op, dispatched by device); `triton` behind
fastml::ig_scale_inputs_triton / fastml::ig_accumulate_triton (kernels/integrated_gradients.py).
"""
import torch

from fastml import _backend
from fastml.ops.integrated_gradients import reference
from fastml.ops.integrated_gradients._validate import check_broadcast

SCALE_OP = "ig_scale_inputs"
ACCUMULATE_OP = "ig_accumulate"


def _triton_registered(call):
    if not hasattr(torch.ops.fastml, "ig_accumulate_triton") or not hasattr(torch.ops.fastml, "ig_scale_inputs_triton"):
        return "the triton ops fastml::ig_*_triton are not registered (kernels/integrated_gradients.py unavailable)"
    return None


def _cuda_registered(call):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastml::ig_accumulate", "CUDA"):
        return "fastml._C has no CUDA kernel for ig_accumulate"
    return None


def _register():
    for op in (SCALE_OP, ACCUMULATE_OP):
        _backend.register(op, _backend.Backend("reference"))
        _backend.register(op, _backend.Backend("cpp"))
        _backend.register(op, _backend.Backend("cuda", supports=_cuda_registered))
        _backend.register(op, _backend.Backend("triton", supports=_triton_registered))


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


def _kernel(name, op):
    if name == "triton":
        return getattr(torch.ops.fastml, op + "_triton")
    return getattr(torch.ops.fastml, op)


def ig_scale_inputs(inputs, baselines, alphas, *, backend="auto"):
    """The points of the straight path at which IG evaluates gradients, step-major as Captum.

    inputs: [B, ...] floating; baselines: broadcastable to inputs, same dtype and device; alphas: [S].
    Returns [S*B, ...] in the inputs' dtype: out[s*B + b] = baselines[b] + alphas[s] * (inputs[b] - baselines[b]).
    """
    baselines = _check_pair(inputs, baselines)
    _check_vector(alphas, "alphas", inputs.device)
    chosen = _backend.select(SCALE_OP, _backend.Call(inputs.device, inputs.dtype), backend)
    if chosen.name == "reference":
        return reference.ig_scale_inputs(inputs, baselines, alphas)
    return _kernel(chosen.name, SCALE_OP)(inputs, baselines, alphas)


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
    dt = reference.acc_dtype(inputs.dtype)
    if acc is not None:
        _check_tensor(acc, "acc")
        if acc.shape != inputs.shape or acc.dtype != dt or acc.device != inputs.device:
            raise ValueError(f"acc must be a {dt} tensor of shape {list(inputs.shape)} on {inputs.device}, got "
                             f"{acc.dtype} {list(acc.shape)} on {acc.device}")
    chosen = _backend.select(ACCUMULATE_OP, _backend.Call(inputs.device, inputs.dtype), backend)
    if chosen.name == "reference":
        attr, sums = reference.ig_accumulate(grads, inputs, baselines, weights, bool(multiply_by_inputs), acc)
    else:
        attr, sums = _kernel(chosen.name, ACCUMULATE_OP)(grads, inputs, baselines, weights,
                                                        bool(multiply_by_inputs), acc)
    return (attr, sums) if return_sums else attr


def _register_fakes():
    """Shapes of the C++ ops' results for torch.compile and opcheck (the Triton ops register their own)."""
    from fastml._ext import load_error

    if load_error() is not None:
        return

    @torch.library.register_fake("fastml::ig_scale_inputs")
    def _scale(inputs, baselines, alphas):
        return inputs.new_empty(alphas.shape[0] * inputs.shape[0], *inputs.shape[1:])

    @torch.library.register_fake("fastml::ig_accumulate")
    def _accumulate(grads, inputs, baselines, weights, multiply_by_inputs, acc):
        dt = reference.acc_dtype(inputs.dtype)
        return inputs.new_empty(inputs.shape, dtype=dt), inputs.new_empty(inputs.shape[0], dtype=dt)


_register_fakes()
