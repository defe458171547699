"""Ops that run one computation across the processes of a torch.distributed group.

`causal_linear_attention` splits one long sequence over the ranks of a group: each rank holds a contiguous slice,
the ranks exchange only fixed-size recurrent states, and the result and gradients equal the single-process op on
the whole sequence. README.md beside this file explains the algorithm, the communication and the measurements.
"""
from fastml.distributed.sequence_parallel import causal_linear_attention

__all__ = ["causal_linear_attention"]
