"""Backend registry and selection (docs/architecture.md, "Backends").

Two things are declared here and nowhere else:

- A backend *kind* (`Kind`): reference, cpp, triton or cuda. It knows whether this machine can run it at all
  (the extension is built, triton imports), which devices it serves, and which of those `auto` may pick. Every
  device and interpreter rule lives in its `device_error`.
- A registered *backend* (`Backend`): one kind's implementation of one op. It carries the implementation itself
  (`impl`: whatever the op's code calls, e.g. a NamedTuple of forward/backward/step callables), the dtypes it
  serves and an optional `supports(call)` for the op's own limits (head dims, shared memory, ...).

`select(op, call, backend)` returns the `Backend` that serves the call; the op then runs `chosen.impl`. No code
outside this module compares backend names.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

ENV_VAR = "FASTML_BACKEND"
ALL_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


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


def _extension_error():
    from fastml._ext import load_error

    return load_error()


def _cuda_extension_error():
    from fastml._ext import has_cuda_ops

    err = _extension_error()
    if err is None and not has_cuda_ops():
        err = "fastml._C was built without the CUDA kernels (torch without CUDA, or nvcc missing at build time)"
    return err


def _triton_device_error(device_type, dtype=None):
    if device_type == "cpu":
        if dtype == torch.bfloat16 and triton_cpu_error() is None:
            # The interpreter runs kernels through numpy, which has no bfloat16 (and its bfloat16 tl.dot is wrong).
            return "bfloat16 is not run under TRITON_INTERPRET=1 (numpy has no bfloat16)"
        return triton_cpu_error()
    if TRITON_INTERPRET:
        return "TRITON_INTERPRET=1 is set, so triton runs on CPU tensors only"
    return None


@dataclass(frozen=True)
class Kind:
    """A kind of backend. `machine_error()` says why this machine cannot run it at all (None: it can);
    `device_error(device_type, dtype)` adds rules for one device type (and dtype; None: any), such as the
    interpreter's; `auto_devices` are the device types on which backend="auto" may pick it (the others need the
    backend named)."""

    name: str
    devices: tuple
    auto_devices: tuple
    machine_error: Callable[[], Optional[str]] = lambda: None
    device_error: Callable[..., Optional[str]] = lambda device_type, dtype=None: None

    def why_not(self, device_type: str, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        reason = self.machine_error()
        if reason is not None:
            return reason
        if device_type not in self.devices:
            return f"it runs on {'/'.join(self.devices)} tensors, not {device_type}"
        return self.device_error(device_type, dtype)


KINDS = {k.name: k for k in (
    Kind("reference", devices=("cpu", "cuda"), auto_devices=("cpu", "cuda")),
    Kind("cpp", devices=("cpu",), auto_devices=("cpu",), machine_error=_extension_error),
    # triton serves CPU tensors only under the interpreter, and only when named (it is a test vehicle there).
    Kind("triton", devices=("cuda", "cpu"), auto_devices=("cuda",), machine_error=triton_import_error,
         device_error=_triton_device_error),
    Kind("cuda", devices=("cuda",), auto_devices=("cuda",), machine_error=_cuda_extension_error),
)}
BACKEND_NAMES = tuple(KINDS)
# Order tried by backend="auto" unless an op sets its own (set_priority); every list ends with the reference.
DEFAULT_PRIORITY = {"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")}


@dataclass(frozen=True)
class Backend:
    """One kind's implementation of one op: `impl` is what the op runs."""

    kind: str
    impl: Any
    dtypes: tuple = ALL_FLOATS
    supports: Optional[Callable[[Call], Optional[str]]] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown backend kind {self.kind!r}; kinds are {BACKEND_NAMES}")

    @property
    def name(self) -> str:
        return self.kind

    def why_not(self, call: Call) -> Optional[str]:
        reason = KINDS[self.kind].why_not(call.device.type, call.dtype)
        if reason is not None:
            return reason
        if call.dtype not in self.dtypes:
            return f"it does not support dtype {call.dtype}"
        return None if self.supports is None else self.supports(call)


_REGISTRY: dict = {}
_PRIORITY: dict = {}


def register(op: str, backend: Backend):
    """Registers `backend` for `op` (a second registration of the same kind replaces the first)."""
    _REGISTRY.setdefault(op, {})[backend.kind] = backend


def set_priority(op: str, device_type: str, order: tuple):
    """The order in which backend="auto" tries the backends of `op` on `device_type` (set from the op's
    measurements); it must end with 'reference', so that every valid call is served."""
    if not order or order[-1] != "reference":
        raise ValueError("a priority list must end with 'reference'")
    unknown = [n for n in order if n not in KINDS]
    if unknown:
        raise ValueError(f"unknown backend kinds {unknown} in the priority list; kinds are {BACKEND_NAMES}")
    _PRIORITY[(op, device_type)] = tuple(order)


def _priority(op, device_type):
    order = _PRIORITY.get((op, device_type)) or DEFAULT_PRIORITY.get(device_type, ("reference",))
    return tuple(n for n in order if device_type in KINDS[n].auto_devices)


def check_name(name, argname="backend"):
    """Raises ValueError unless `name` is 'auto' or a backend kind."""
    if not isinstance(name, str) or name not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"{argname} must be 'auto' or one of {BACKEND_NAMES}, got {name!r}")


def select(op: str, call: Call, backend: str = "auto") -> Backend:
    """The backend that serves `call`; `backend` is the caller's `backend=` argument. Run `.impl` of the result."""
    check_name(backend, "backend")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto") or "auto"
        check_name(env, ENV_VAR)
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


def _machine_reason(name):
    """Why backend kind `name` cannot run any call on this machine (None: it can run some)."""
    kind = KINDS[name]
    reason = kind.machine_error()
    if reason is not None:
        return reason
    usable = [d for d in kind.devices if d == "cpu" or torch.cuda.is_available()]
    if not usable:
        return "no CUDA device"
    device_reasons = [kind.device_error(d) for d in usable]
    if all(r is not None for r in device_reasons):
        return "; ".join(device_reasons)
    return None


def backends(op: Optional[str] = None):
    """{name: (available, reason_or_None)} for this machine.

    Without `op`: every backend kind. With `op` (e.g. "causal_linear_attention"): only the backends that op
    registers, each unavailable when its kind cannot run here. A kind that is available may still refuse a
    given call (dtype, device, sizes): `backend=` then raises BackendUnavailable with the reason.
    """
    if op is None:
        names = BACKEND_NAMES
    else:
        if op not in _REGISTRY:
            raise ValueError(f"op must be one of {sorted(_REGISTRY)}, got {op!r}")
        names = tuple(n for n in BACKEND_NAMES if n in _REGISTRY[op])
    out = {}
    for name in names:
        reason = _machine_reason(name)
        out[name] = (reason is None, reason)
    return out


def ops():
    """The names of the ops that registered backends."""
    return sorted(_REGISTRY)


def op_backends(op: str):
    """The backends registered for one op, by name."""
    return dict(_REGISTRY[op])
