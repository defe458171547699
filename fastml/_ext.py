"""Loads the compiled extension fastml._C once. If it is missing, the cpp and cuda backends say why.

Imported by fastml._library.load() after every op schema is declared, so the C++ kernels attach to declared ops.
The outcome is kept in module constants, not computed per call, so that torch.compile traces nothing here.
"""
import importlib


def _load():
    try:
        return importlib.import_module("fastml._C"), None  # importing registers the C++ kernels
    except ImportError as exc:
        return None, f"the compiled extension fastml._C is not available ({exc}); build fastml with `make install`"


_MODULE, LOAD_ERROR = _load()
# True when fastml._C was built with the CUDA kernels: a flag the module sets at build time (no device is queried).
HAS_CUDA_OPS = bool(getattr(_MODULE, "WITH_CUDA", 0))


def load_error():
    """None if fastml._C is loaded (its kernels registered in torch.ops.fastml), else the reason it is not."""
    return LOAD_ERROR


def has_cuda_ops():
    return HAS_CUDA_OPS
