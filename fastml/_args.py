"""Argument checks shared by the ops' public functions: each raises TypeError or ValueError naming the argument."""
import math
import numbers

import torch

from fastml._backend import ALL_FLOATS


def is_real(x):
    """A Python or numpy real number (not a bool)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def real(x, name, *, positive=False, nonnegative=False):
    """`x` as a finite float (a Python or numpy real, or a one-element tensor that needs no gradient)."""
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.requires_grad:
        x = float(x)
    if not is_real(x):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be > 0, got {x}")
    if nonnegative and x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}")
    return x


def floating_tensor(t, name):
    """Checks that `t` is a tensor of a floating dtype the kernels take (float32, float64, float16, bfloat16)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in ALL_FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float32, float64, float16 or bfloat16), got dtype "
                        f"{t.dtype}")
