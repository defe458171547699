"""Numerical conventions shared by every op: the one place that says which dtype a kernel accumulates in."""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of `dtype`: float64 for float64, float32 for everything else (float32,
    float16, bfloat16). Recurrent states, running sums and attributions are kept in it."""
    return torch.float64 if dtype == torch.float64 else torch.float32
