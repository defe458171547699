"""Triton kernels, installed as fastml.kernels. Importing this package registers the Triton torch ops
(fastml::<op>_{fwd,bwd}_triton) when triton is installed; without triton it registers nothing and the triton
backend reports why it is unavailable."""
from fastml._backend import triton_import_error

if triton_import_error() is None:
    from fastml.kernels import integrated_gradients, linear_attention  # noqa: F401
