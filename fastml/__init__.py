"""fastml: fused kernels for PyTorch.

Every op takes `backend="auto"` ("reference", "cpp", "triton", "cuda"); see ARCHITECTURE.md and each op's README.
"""
from fastml._backend import BackendUnavailable, backends
from fastml.ops.integrated_gradients import (
    IntegratedGradients,
    LayerIntegratedGradients,
    ig_accumulate,
    ig_scale_inputs,
    integrated_gradients,
)
from fastml.ops.linear_attention import (
    LinearAttentionState,
    causal_linear_attention,
    linear_attention,
    linear_attention_step,
)
from fastml import kernels as _kernels  # noqa: F401  (registers the Triton ops where triton is installed)
from fastml import nn  # noqa: E402

__all__ = [
    "BackendUnavailable",
    "backends",
    "IntegratedGradients",
    "LayerIntegratedGradients",
    "ig_accumulate",
    "ig_scale_inputs",
    "integrated_gradients",
    "LinearAttentionState",
    "causal_linear_attention",
    "linear_attention",
    "linear_attention_step",
    "nn",
]
__version__ = "0.1.0"
