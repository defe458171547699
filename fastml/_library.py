"""Where fastml's torch ops are declared, and how an op package is found.

Each op package (fastml/ops/<op>/) declares its kernel ops in its `schema.py` with `declare(OpSchema(...))`:
the schema string and the fake (meta) function are written there once and shared by every implementation:

- `fastml::<name>`: the C++ op; csrc/cpu/<op>.cpp and csrc/cuda/<op>_binding.cpp register its CPU and CUDA
  kernels with TORCH_LIBRARY_IMPL (no C++ file declares a schema);
- `fastml::<name>_triton`: the Triton twin, same schema; kernels/<op>.py registers its launcher with
  `@implement(<name>, "triton")`.

`load()` imports every op package under fastml.ops (so schemas are declared and backends registered), then the
compiled extension fastml._C (whose kernels attach to those schemas) and the Triton kernels (fastml.kernels),
without a hand-kept list of ops.
"""
import functools
import importlib
import importlib.util
import os
import pkgutil
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

NAMESPACE = "fastml"
LIB = torch.library.Library(NAMESPACE, "DEF")


@dataclass(frozen=True)
class OpSchema:
    """One kernel op: `schema` is the argument list and results, e.g. "(Tensor x, float eps) -> Tensor";
    `fake(*args)` returns empty tensors of the results' shapes and dtypes (for torch.compile and opcheck);
    `check(*args)`, if given, raises ValueError/TypeError naming a bad argument. The Python implementations
    (`implement`) run it before their kernels; the C++ kernels carry the same checks as TORCH_CHECKs."""

    name: str
    schema: str
    fake: Callable
    twins: tuple = ("triton",)
    check: Optional[Callable] = None

    def qualnames(self):
        return (self.name,) + tuple(f"{self.name}_{t}" for t in self.twins)


_DECLARED: dict = {}


def declare(*ops: OpSchema):
    """Defines each op and its twins in the fastml namespace with one schema and one fake function."""
    for op in ops:
        _DECLARED[op.name] = op
        for qual in op.qualnames():
            LIB.define(qual + op.schema)
            torch.library.register_fake(f"{NAMESPACE}::{qual}", op.fake, lib=LIB)


def implement(name: str, kind: str):
    """Decorator: registers a Python launcher as the CPU and CUDA kernel of fastml::<name>_<kind>, behind the op's
    argument check."""
    check = _DECLARED[name].check

    def wrap(fn):
        if check is None:
            run = fn
        else:
            @functools.wraps(fn)
            def run(*args):
                check(*args)
                return fn(*args)

        torch.library.impl(f"{NAMESPACE}::{name}_{kind}", ("cpu", "cuda"), run, lib=LIB)
        return run

    return wrap


def _kernels_package():
    """fastml.kernels: installed from the top-level kernels/ folder by setup.py; in a source tree (no install, or
    an in-place build) it is mounted from that folder directly."""
    try:
        return importlib.import_module(f"{NAMESPACE}.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != f"{NAMESPACE}.kernels":
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    spec = importlib.util.spec_from_file_location(f"{NAMESPACE}.kernels", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    if spec is None:
        raise ImportError(f"fastml.kernels is not installed and {folder} is missing")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[NAMESPACE], "kernels", module)
    return module


def op_packages():
    """Every op package under fastml.ops, imported (which declares its schemas and registers its backends)."""
    import fastml.ops

    return [importlib.import_module(f"fastml.ops.{m.name}")
            for m in sorted(pkgutil.iter_modules(fastml.ops.__path__), key=lambda m: m.name) if m.ispkg]


def load():
    """Imports the op packages, then fastml._C and fastml.kernels; returns the op packages."""
    packages = op_packages()
    from fastml import _ext  # noqa: F401  (loads fastml._C after every schema is declared)

    _kernels_package()
    return packages
