"""Loads the compiled extension fastml._C once. If it is missing, the cpp and cuda backends say why."""
import functools
import importlib


@functools.lru_cache(maxsize=None)
def load_error():
    """None if fastml._C is loaded (its ops registered in torch.ops.fastml), else the reason it is not."""
    try:
        importlib.import_module("fastml._C")  # importing registers the ops
    except ImportError as exc:
        return f"the compiled extension fastml._C is not available ({exc}); build fastml with `make install`"
    return None


@functools.lru_cache(maxsize=None)
def has_cuda_ops():
    """True when fastml._C was built with the CUDA kernels."""
    if load_error() is not None:
        return False
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("fastml::linear_attention_fwd", "CUDA")
