"""Triton kernels, installed as fastml.kernels. Importing this package imports every kernel module in it, and
each registers its launchers as the triton twins of its op's kernel ops (fastml::<op>_*_triton). Without triton it
imports nothing and the triton backend reports why it is unavailable."""
import importlib
import pkgutil

from fastml._backend import triton_import_error

# This folder is fastml.kernels. With the repository's root on sys.path it is also visible as a top-level
# `kernels`, a name another package uses (transformers looks for one by importing it): imported under that name it
# does nothing, rather than register every launcher a second time or break the importer.
if __name__ == "fastml.kernels" and triton_import_error() is None:
    for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{_info.name}")

