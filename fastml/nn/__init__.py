"""nn.Module layers over fastml's functional ops."""
from fastml.nn.linear_attention import CausalLinearAttention

__all__ = ["CausalLinearAttention"]
