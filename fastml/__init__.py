"""fastml: fused kernels for PyTorch.

Every op takes `backend="auto"` ("reference", "cpp", "triton", "cuda"); `fastml.backends()` says which this
machine has. The public functions of every op package under fastml/ops (its `__all__`) are re-exported here;
docs/api.md documents them and docs/architecture.md how the pieces fit.
"""
from fastml import _library
from fastml._backend import BackendUnavailable, backends

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "backends", "nn"]
for _package in _library.load():
    for _name in _package.__all__:
        globals()[_name] = getattr(_package, _name)
        __all__.append(_name)
del _package, _name

from fastml import distributed, nn, probe  # noqa: E402  (sequence-parallel ops; layers; encoder probing)

__all__.append("distributed")
__all__.append("probe")
