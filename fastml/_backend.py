"""Backend registry and selection (ARCHITECTURE.md, "Backend selection").

Each op registers its backends with `register(op, Backend(name, ...))` and maps the chosen name to its torch ops. A backend declares the devices and dtypes it
serves and answers `why_not(call)`; `select(op, call, backend)` returns the backend that serves a call or raises
BackendUnavailable with the reason.
"""
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

ENV_VAR = "FASTML_BACKEND"
BACKEND_NAMES = ("reference", "cpp", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    """Raised when the backend named by `backend=` or FASTML_BACKEND cannot serve a call."""


@dataclass(frozen=True)
class Call:
    """What a backend needs to know to accept or refuse a call."""

    device: torch.device
    dtype: torch.dtype
    options: dict = field(default_factory=dict)


# Read once at import, like Triton itself, which picks the interpreter when fastml.kernels decorates its kernels:
# setting the variable later changes neither.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_interpret():
    return TRITON_INTERPRET


def _triton_import():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


# Decided once at import, so that torch.compile traces no import.
TRITON_IMPORT_ERROR = _triton_import()


def triton_import_error():
    return TRITON_IMPORT_ERROR


def triton_cpu_error():
    """Why the triton backend cannot run on CPU tensors in this process (None when it can: the interpreter)."""
    if TRITON_IMPORT_ERROR is not None:
        return TRITON_IMPORT_ERROR
    return None if TRITON_INTERPRET else "triton serves CPU tensors only under TRITON_INTERPRET=1"


def _cpp_available():
    from fastml._ext import load_error

    return load_error()


def _cuda_available():
    from fastml._ext import has_cuda_ops, load_error

    err = load_error()
    if err is not None:
        return err
    if not has_cuda_ops():
        return "fastml._C was built without the CUDA kernels (torch without CUDA, or nvcc missing at build time)"
    return None


def _triton_available():
    return triton_import_error()


MACHINE_CHECKS = {
    "reference": lambda: None,
    "cpp": _cpp_available,
    "cuda": _cuda_available,
    "triton": _triton_available,
}
DEFAULT_DEVICES = {
    "reference": ("cpu", "cuda"),
    "cpp": ("cpu",),
    "cuda": ("cuda",),
    "triton": ("cuda", "cpu"),
}
ALL_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass
class Backend:
    """One implementation of an op. `supports(call)` returns a reason it cannot serve the call, or None."""

    name: str
    dtypes: tuple = ALL_FLOATS
    devices: Optional[tuple] = None
    supports: Optional[Callable[[Call], Optional[str]]] = None

    def why_not(self, call: Call) -> Optional[str]:
        reason = MACHINE_CHECKS[self.name]()
        if reason is not None:
            return reason
        devices = self.devices or DEFAULT_DEVICES[self.name]
        if call.device.type not in devices:
            return f"it runs on {'/'.join(devices)} tensors, not {call.device.type}"
        if self.name == "triton" and call.device.type == "cpu" and triton_cpu_error() is not None:
            return triton_cpu_error()
        if self.name == "triton" and call.device.type == "cuda" and triton_interpret():
            return "TRITON_INTERPRET=1 is set, so triton runs on CPU tensors only"
        if call.dtype not in self.dtypes:
            return f"it does not support dtype {call.dtype}"
        if self.supports is not None:
            return self.supports(call)
        return None


_REGISTRY: dict = {}
# Order tried by backend="auto". The CUDA order is per op (set from the op's benchmarks, see its README).
_PRIORITY: dict = {}
DEFAULT_PRIORITY = {"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")}


def register(op: str, backend: Backend):
    _REGISTRY.setdefault(op, {})[backend.name] = backend


def set_priority(op: str, device_type: str, order: tuple):
    if order[-1] != "reference":
        raise ValueError("a priority list must end with 'reference'")
    _PRIORITY[(op, device_type)] = tuple(order)


def _priority(op, device_type):
    order = _PRIORITY.get((op, device_type)) or DEFAULT_PRIORITY.get(device_type, ("reference",))
    if device_type == "cpu":
        # triton serves CPU tensors only when named explicitly (and TRITON_INTERPRET=1).
        order = tuple(n for n in order if n != "triton")
    return order


def _check_name(name, argname):
    if not isinstance(name, str) or name not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"{argname} must be 'auto' or one of {BACKEND_NAMES}, got {name!r}")


def select(op: str, call: Call, backend: str = "auto") -> Backend:
    """The backend that serves `call`; `backend` is the caller's `backend=` argument."""
    _check_name(backend, "backend")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto") or "auto"
        _check_name(env, ENV_VAR)
        backend = env
    table = _REGISTRY[op]
    if backend != "auto":
        chosen = table.get(backend)
        reason = f"{op} has no {backend} implementation" if chosen is None else chosen.why_not(call)
        if reason is not None:
            raise BackendUnavailable(f"backend {backend!r} cannot serve this {op} call: {reason}")
        return chosen
    reasons = []
    for name in _priority(op, call.device.type):
        chosen = table.get(name)
        if chosen is None:
            continue
        reason = chosen.why_not(call)
        if reason is None:
            return chosen
        reasons.append(f"{name}: {reason}")
    raise BackendUnavailable(f"no backend can serve this {op} call ({'; '.join(reasons)})")


def backends():
    """{name: (available, reason_or_None)} for this machine, whatever the op."""
    out = {}
    for name in BACKEND_NAMES:
        reason = MACHINE_CHECKS[name]()
        if reason is None and name == "triton":
            if not torch.cuda.is_available() and not triton_interpret():
                reason = "no CUDA device (and TRITON_INTERPRET=1 is not set)"
        if reason is None and name == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device"
        out[name] = (reason is None, reason)
    return out


def op_backends(op: str):
    """The backends registered for one op, by name."""
    return dict(_REGISTRY[op])
