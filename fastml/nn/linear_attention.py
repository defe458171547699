"""Multi-head causal linear attention layer."""
import torch
import torch.distributed as dist
from torch import nn

from fastml._numerics import acc_dtype
from fastml.distributed import causal_linear_attention as sequence_parallel_attention
from fastml.ops.linear_attention import LinearAttentionState, causal_linear_attention, linear_attention_step
from fastml.ops.linear_attention._validate import check_feature_map, check_scalars


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


class CausalLinearAttention(nn.Module):
    """Multi-head causal linear attention: q/k/v projections, fastml.causal_linear_attention, output projection.

    forward(x [B, T, E], state=None, return_state=False) -> y [B, T, E] (and the LinearAttentionState);
    step(x_t [B, E], state) -> (y_t [B, E], state) for one-token decoding. Each head has E / num_heads dims.
    With sequence_parallel_group (a torch.distributed process group), forward takes this rank's slice of each
    sequence (ranks in sequence order) and runs fastml.distributed.causal_linear_attention over the group: a
    `state` is then given on the group's first rank only, and the returned state is the whole sequence's, on
    every rank.
    """

    def __init__(self, embed_dim, num_heads, *, feature_map="elu+1", bias=True, eps=1e-6, device=None, dtype=None,
                 sequence_parallel_group=None):
        super().__init__()
        if sequence_parallel_group is not None and not (dist.is_available()
                                                        and isinstance(sequence_parallel_group, dist.ProcessGroup)):
            raise TypeError("sequence_parallel_group must be a torch.distributed ProcessGroup or None, got "
                            f"{type(sequence_parallel_group).__name__}")
        if not _is_int(embed_dim) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if not _is_int(num_heads) or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing embed_dim={embed_dim}, got {num_heads!r}")
        check_feature_map(feature_map)
        check_scalars(normalize=True, eps=eps, scale=1.0)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.feature_map = feature_map
        self.eps = eps
        self.sequence_parallel_group = sequence_parallel_group
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def _heads(self, x):
        # [..., 3E] -> three [B, H, T, D] views (non-contiguous; the op copies once if its kernel needs to).
        *lead, _ = x.shape
        q, k, v = self.qkv_proj(x).view(*lead, 3, self.num_heads, self.head_dim).unbind(-3)
        return q, k, v

    def _check(self, x, name, ndim, layout):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor {layout}, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != ndim or x.shape[-1] != self.embed_dim:
            raise ValueError(f"{name} must be {layout}, got shape {list(x.shape)}")

    def forward(self, x, state=None, return_state=False):
        self._check(x, "x", 3, f"[B, T, {self.embed_dim}]")
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._heads(x))
        if self.sequence_parallel_group is not None:
            # The final state only when asked for: every rank asks alike (checked), and without it the backward
            # exchanges half as much.
            out = sequence_parallel_attention(q, k, v, group=self.sequence_parallel_group,
                                              feature_map=self.feature_map, eps=self.eps, initial_state=state,
                                              output_final_state=bool(return_state))
            o, new_state = out if return_state else (out, None)
        else:
            o, new_state = causal_linear_attention(q, k, v, feature_map=self.feature_map, eps=self.eps,
                                                   initial_state=state, output_final_state=True)
        y = self.out_proj(o.transpose(1, 2).reshape(B, T, self.embed_dim))
        return (y, new_state) if return_state else y

    def step(self, x_t, state=None):
        self._check(x_t, "x_t", 2, f"[B, {self.embed_dim}]")
        q, k, v = self._heads(x_t)
        o, new_state = linear_attention_step(q, k, v, state, feature_map=self.feature_map, eps=self.eps)
        return self.out_proj(o.reshape(x_t.shape[0], self.embed_dim)), new_state

    def initial_state(self, batch_size, device=None):
        """Zero state for `batch_size` sequences (float32, float64 for a float64 layer)."""
        w = self.qkv_proj.weight
        sd = acc_dtype(w.dtype)
        shape = (batch_size, self.num_heads, self.head_dim)
        return LinearAttentionState(w.new_zeros(*shape, self.head_dim, dtype=sd, device=device),
                                    w.new_zeros(*shape, dtype=sd, device=device))

__all__ = ["CausalLinearAttention"]
