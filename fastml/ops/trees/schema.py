"""The kernel op of the Eisner decoder, fastml::eisner (C++ only: it has no Triton twin).

- eisner(scores [B, n, n], lengths [B]) -> heads [B, n] int64. scores: contiguous float32 or float64, scores[b, h, d]
  the score of the arc h -> d, index 0 the root; lengths: contiguous int64 on scores' device, each in [1, n],
  counting the root. heads[b, d] is the head of word d in the highest-scoring projective tree of sentence b rooted
  at 0 (the root may have several children); heads[b, 0] = -1 and heads[b, d] = -1 for d >= lengths[b]. Scores
  within a sentence's length must not be NaN or +inf (-inf forbids an arc); entries past it are never read.
  Ties: among equal candidates of a chart cell the smallest split index wins (fastml/ops/trees/README.md).
  The kernel checks all of this itself (TORCH_CHECK); the public function fastml.probe.eisner validates first and
  raises ValueError/TypeError naming the argument.
"""
import torch

from fastml._library import OpSchema, declare

FLOATS = (torch.float32, torch.float64)


def bad_scores(scores, lengths):
    """Whether any sentence's scores (within its length) hold a NaN or +inf. One reduction in the usual case where
    the whole tensor's maximum is below +inf (a NaN anywhere makes it NaN, which is not); only otherwise are the
    padded entries masked out."""
    if scores.numel() == 0 or float(scores.amax()) < float("inf"):
        return False
    n = scores.shape[-1]
    inside = torch.arange(n, device=scores.device)[None, :] < lengths[:, None]
    mask = inside[:, :, None] & inside[:, None, :]
    return bool(((torch.isnan(scores) | (scores == float("inf"))) & mask).any())


def _eisner_fake(scores, lengths):
    return scores.new_empty((scores.shape[0], scores.shape[1]), dtype=torch.int64)


EISNER = OpSchema("eisner", "(Tensor scores, Tensor lengths) -> Tensor", _eisner_fake, twins=())
declare(EISNER)
