"""Captum's argument conventions: inputs, baselines, targets and additional forward arguments.

Rows of a batch that goes through the model are step-major: row s*B + b is example b at step s, as in Captum.
"""
import numbers

import torch

from fastml.ops.integrated_gradients._validate import check_broadcast


def as_tuple(inputs, name="inputs"):
    """(tuple of tensors, whether the caller passed a tuple)."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), False
    if isinstance(inputs, tuple) and len(inputs) > 0 and all(isinstance(t, torch.Tensor) for t in inputs):
        return inputs, True
    raise TypeError(f"{name} must be a tensor or a non-empty tuple of tensors, got {type(inputs).__name__}")


def check_inputs(inputs, *, floating=True):
    batch = None
    for i, t in enumerate(inputs):
        if floating and not t.is_floating_point():
            raise TypeError(f"inputs[{i}] must be a floating tensor, got dtype {t.dtype} (token ids belong to "
                            "LayerIntegratedGradients)")
        if t.dim() < 1:
            raise ValueError(f"inputs[{i}] must have a batch dimension, got a 0-d tensor")
        if batch is not None and t.shape[0] != batch:
            raise ValueError(f"inputs must share the batch dimension, got {batch} and {t.shape[0]}")
        batch = t.shape[0]
        if t.device != inputs[0].device:
            raise ValueError(f"inputs[{i}] is on {t.device} but inputs[0] is on {inputs[0].device}")
    return batch


def format_baselines(baselines, inputs):
    """Baselines as a tuple of tensors with each input's dtype and device, expanded (a view) to its shape."""
    if baselines is None:
        baselines = (0,) * len(inputs)
    elif isinstance(baselines, (list, dict, set)):
        raise TypeError(f"baselines must be None, a number, a tensor or a tuple of those, got "
                        f"{type(baselines).__name__}")
    elif not isinstance(baselines, tuple):
        baselines = (baselines,)
    if len(baselines) != len(inputs):
        raise ValueError(f"baselines must have one entry per input ({len(inputs)}), got {len(baselines)}")
    out = []
    for i, (b, x) in enumerate(zip(baselines, inputs)):
        if isinstance(b, numbers.Number) and not isinstance(b, bool):
            out.append(torch.full((), b, dtype=x.dtype, device=x.device).expand(x.shape))
            continue
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"baselines[{i}] must be a number or a tensor, got {type(b).__name__}")
        check_broadcast(b, x, f"baselines[{i}]", f"inputs[{i}]")
        out.append(b.to(x.dtype).expand(x.shape))
    return tuple(out)


def check_target(target, batch):
    """Validates the target's form (its range is checked against the model's output, see select)."""
    if target is None or isinstance(target, (int, tuple)) and not isinstance(target, bool):
        return
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"target must be an integer tensor, got dtype {target.dtype}")
        if target.numel() > 1 and (target.dim() != 1 or target.numel() != batch):
            raise ValueError(f"a target tensor must be one index or one per example ({batch}), got shape "
                             f"{list(target.shape)}")
        return
    if isinstance(target, list):
        if len(target) != batch:
            raise ValueError(f"a target list must have one entry per example ({batch}), got {len(target)}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in target) and not all(
                isinstance(t, tuple) for t in target):
            raise TypeError("target list entries must all be ints or all be tuples")
        return
    raise TypeError(f"target must be None, an int, a tuple, a list or a tensor, got {type(target).__name__}")


def subset_target(target, idx):
    """The target of the examples `idx` (a list of example indices)."""
    if isinstance(target, list):
        return [target[i] for i in idx]
    if isinstance(target, torch.Tensor) and target.numel() > 1:
        return target[torch.as_tensor(idx, device=target.device)]
    return target


def format_additional(args, batch):
    """A tuple; a tensor argument with a dim must have the batch as its first dim (its rows follow the examples
    through every model call)."""
    if args is None:
        return ()
    args = args if isinstance(args, tuple) else (args,)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] != batch:
            raise ValueError(f"additional_forward_args[{i}]: a tensor argument must have the batch ({batch}) as "
                             f"its first dim, got shape {list(a.shape)}")
    return args


def subset_additional(args, idx, batch):
    """Tensors with a dim take the rows `idx` (example indices, repeats allowed) along dim 0, as Captum repeats
    them per step; everything else passes through."""
    if len(idx) == batch and list(idx) == list(range(batch)):
        return args
    index = None
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            index = torch.as_tensor(idx, device=a.device) if index is None or index.device != a.device else index
            a = a.index_select(0, index)
        out.append(a)
    return tuple(out)


def _check_index(index, size, what):
    if not -size <= index < size:
        raise IndexError(f"target {index} is out of range for {what} of size {size}")


def _check_tuple(index, output):
    """A target tuple indexes the output's dims after the batch: no more indices than dims, each in range."""
    if len(index) > output.dim() - 1:
        raise IndexError(f"target {index} has more indices than the output's {output.dim() - 1} dims after the "
                         "batch")
    for d, i in enumerate(index):
        if isinstance(i, int):
            _check_index(i, output.shape[d + 1], f"output dim {d + 1}")


def select(output, target):
    """The model output [N, ...] reduced to one scalar per row [N] by `target`, with Captum's rules. A target
    out of range raises IndexError naming `target`."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"forward_func must return a tensor, got {type(output).__name__}")
    n = output.shape[0] if output.dim() else 0
    if target is None:
        selected = output
    elif isinstance(target, torch.Tensor) and target.numel() == 1:
        return select(output, int(target.item()))
    elif isinstance(target, (int, tuple)):
        index = target if isinstance(target, tuple) else (target,)
        _check_tuple(index, output)
        selected = output[(slice(None),) + index]
    elif isinstance(target, torch.Tensor) or isinstance(target[0], int):
        if output.dim() != 2:
            raise ValueError(f"a target per example needs a 2-d output [N, C], got shape {list(output.shape)}")
        t = torch.as_tensor(target, device=output.device).reshape(n, 1)
        lo, hi = int(t.min()), int(t.max())
        _check_index(lo, output.shape[1], "output dim 1")
        _check_index(hi, output.shape[1], "output dim 1")
        selected = output.gather(1, t % output.shape[1]).squeeze(-1)
    else:
        for t in target:
            _check_tuple(t, output)
        selected = torch.stack([output[(i,) + t] for i, t in enumerate(target)])
    if selected.dim() == 0 or selected[0].numel() != 1:
        raise ValueError("target is needed: forward_func must give one scalar per example after target selection, "
                         f"got output shape {list(output.shape)}")
    return selected


class CaptumAttribution:
    """What Captum's attribution classes share: the model, `multiplies_by_inputs` and `has_convergence_delta`."""

    def __init__(self, forward_func, multiply_by_inputs=True):
        self.forward_func = forward_func
        self._multiply_by_inputs = multiply_by_inputs

    @property
    def multiplies_by_inputs(self):
        return self._multiply_by_inputs

    def has_convergence_delta(self):
        return True
