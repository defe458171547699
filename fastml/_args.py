"""Argument checks shared by the ops' public functions: each raises TypeError or ValueError naming the argument."""
import math
import numbers

import torch


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
