"""Loads the compiled extension fastml._C once, at import. If it is missing, the cpp and cuda backends say why.

The outcome is kept in module constants, not computed per call, so that torch.compile traces nothing here.
"""
import importlib

import torch


def _load():
    try:
        importlib.import_module("fastml._C")  # importing registers the ops
    except ImportError as exc:
        return f"the compiled extension fastml._C is not available ({exc}); build fastml with `make install`"
    return None


LOAD_ERROR = _load()
# True when fastml._C was built with the CUDA kernels (a dispatch-table look-up; no device is queried).
HAS_CUDA_OPS = LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastml::linear_attention_fwd", "CUDA")


def load_error():
    """None if fastml._C is loaded (its ops registered in torch.ops.fastml), else the reason it is not."""
    return LOAD_ERROR


def has_cuda_ops():
    return HAS_CUDA_OPS
