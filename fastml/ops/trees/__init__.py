"""Tree decoders over word-pair score matrices, for probing encoders (Perturbed Masking): `eisner`, the projective
maximum spanning tree (first-order Eisner), and `mart`, the top-down binary split tree.

The public home of both is `fastml.probe`; this package's `__all__` is empty, so nothing lands at fastml's top
level. `eisner` has the backends `reference` (reference.py, batched PyTorch) and `cpp` (csrc/cpu/eisner.cpp, behind
the torch op fastml::eisner declared in schema.py); it has no triton backend (a sequential dynamic programme over
short sentences, which the CPU kernel serves). `mart` is plain PyTorch (no backend choice). The recurrences, the
tie rule and the measurements are in README.md beside this file.
"""
import torch

from fastml import _backend
from fastml.ops.trees import reference, schema  # noqa: F401  (schema declares the kernel op)

OP = "eisner"
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_scores(scores, dims):
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}")
    if scores.dtype not in _FLOATS:
        raise TypeError(f"scores must be a floating tensor, got dtype {scores.dtype}")
    shape = list(scores.shape)
    if scores.dim() not in dims:
        want = " or ".join({2: "[n, n]", 3: "[B, n, n]"}[d] for d in dims)
        raise ValueError(f"scores must be {want}, got shape {shape}")
    if scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must be square in its last two dims, got shape {shape}")
    if scores.shape[-1] < 1:
        raise ValueError(f"scores must have n >= 1, got shape {shape}")


def _lengths(lengths, B, n, device, single):
    if lengths is None:
        return torch.full((B,), n, dtype=torch.int64, device=device)
    if single:
        if isinstance(lengths, torch.Tensor) and lengths.numel() == 1 and not lengths.is_floating_point() \
                and lengths.dtype != torch.bool:
            lengths = int(lengths)
        if not isinstance(lengths, int) or isinstance(lengths, bool):
            raise TypeError(f"lengths must be None or an int for a single [n, n] scores matrix, got "
                            f"{type(lengths).__name__}")
        lengths = torch.tensor([lengths], dtype=torch.int64, device=device)
    elif isinstance(lengths, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in lengths):
            raise TypeError("lengths must be a tensor or a list of ints")
        lengths = torch.tensor(lengths, dtype=torch.int64, device=device).reshape(-1)
    elif not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be None, an integer tensor or a list of ints, got {type(lengths).__name__}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape [{B}] (one per sentence), got {list(lengths.shape)}")
    lengths = lengths.to(device=device, dtype=torch.int64).contiguous()
    if B:
        lo, hi = (int(v) for v in torch.aminmax(lengths))
        if lo < 1 or hi > n:
            raise ValueError(f"lengths must lie in [1, n] = [1, {n}] (they count the root), got {lengths.tolist()}")
    return lengths


def eisner(scores, lengths=None, *, backend="auto"):
    """Projective maximum spanning trees by first-order Eisner (O(n^3) per sentence).

    scores [B, n, n]: scores[b, h, d] is the score of the arc h -> d (head h, dependent d); index 0 is the root.
    lengths [B] (an integer tensor or a list of ints; default n for every sentence) counts the root: sentence b is
    words 0 .. lengths[b] - 1, and scores past it are never read. Returns heads [B, n] int64: heads[b, d] is the
    head of word d, heads[:, 0] = -1 and -1 past each length. The root may have several children. A single [n, n]
    matrix (with lengths None or an int) returns [n].

    The diagonal and column 0 (arcs into the root) are never used. -inf forbids an arc; NaN or +inf within a
    sentence raises ValueError. Among trees of equal score, every chart cell takes the smallest split point, so the
    result is deterministic and the same on every backend (README.md). float16/bfloat16 scores are decoded in
    float32. backend: "auto", "reference" or "cpp" (no triton backend).
    """
    _check_scores(scores, (2, 3))
    single = scores.dim() == 2
    batch = scores[None] if single else scores
    B, n = batch.shape[0], batch.shape[1]
    lengths = _lengths(lengths, B, n, batch.device, single)
    if batch.dtype not in schema.FLOATS:
        batch = batch.float()
    batch = batch.detach().contiguous()
    if B and schema.bad_scores(batch, lengths):
        raise ValueError("scores must not be NaN or +inf within a sentence's length (-inf forbids an arc)")
    impl = _backend.select(OP, _backend.Call(batch.device, batch.dtype), backend).impl
    heads = impl(batch, lengths)
    return heads[0] if single else heads


def mart(scores):
    """The top-down binary split tree of an [n, n] score matrix S (e.g. a Perturbed Masking impact matrix).

    A span i..j of two or more words splits at the k (left L = i..k, right R = k+1..j) maximizing
    mean(S[L, L]) + mean(S[R, R]) - mean(S[L, R]) - mean(S[R, L]) (diagonals included; the smallest k on ties),
    then each side is split the same way. Returns nested 2-tuples of word indices; a single word is its int (n = 1
    returns 0). Float64 2-D prefix sums make each candidate cut O(1): O(n^2) for the sums plus O(n) per split,
    O(n^2) in all at worst. Runs on the CPU (PyTorch prefix sums, cuts scored in Python floats). NaN or infinite
    scores raise ValueError.
    """
    _check_scores(scores, (2,))
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite (no NaN or inf)")
    return reference.mart(scores)


def _reference_impl(scores, lengths):
    return reference.eisner(scores, lengths)


def _register():
    _backend.register(OP, _backend.Backend("reference", _reference_impl, dtypes=schema.FLOATS))
    _backend.register(OP, _backend.Backend("cpp", torch.ops.fastml.eisner, dtypes=schema.FLOATS))


_register()

__all__ = []  # public through fastml.probe
