"""Triton kernels, installed as fastml.kernels. Importing this package imports every kernel module in it, and
each registers its launchers as the triton twins of its op's kernel ops (fastml::<op>_*_triton). Without triton it
imports nothing and the triton backend reports why it is unavailable."""
import importlib
import pkgutil

from fastml._backend import triton_import_error

if triton_import_error() is None:
    for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{_info.name}")

