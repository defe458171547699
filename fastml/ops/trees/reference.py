"""The tree decoders in plain PyTorch: the definition of `eisner` (batched and vectorized over sentences, start
positions and split points; the backtrack walks each sentence's chosen cells) and the one implementation of `mart`.

Eisner's chart, for 0 <= s < t < n (README.md beside this file):

    I_R[s, t] = max_{s <= r < t} C_R[s, r] + C_L[r + 1, t]  +  scores[s, t]   (arc s -> t)
    I_L[s, t] = same max                                     +  scores[t, s]   (arc t -> s; -inf for s = 0)
    C_R[s, t] = max_{s < r <= t} I_R[s, r] + C_R[r, t]
    C_L[s, t] = max_{s <= r < t} C_L[s, r] + I_L[r, t]
    C_R[s, s] = C_L[s, s] = 0

The tree of a sentence of length L is C_R[0, L - 1]. Every maximum takes the smallest split r among equal
candidates (torch's max over a dim returns the first maximal index), which the cpp kernel reproduces exactly.
"""
import torch

# cell kinds on the backtrack stack
_CR, _CL, _IR, _IL = 0, 1, 2, 3


def _antidiagonal(X, w, m, first):
    """The [B, w, m] view of a diagonal-major table X [B, n, n] (X[:, d, s] is cell [s, s + d]) whose element
    [j, s] is X[:, first + j, s + w - first - j]: the cells ending at s + w, widths first, first + 1, ... (one
    strided view, no copy)."""
    B, n, _ = X.shape
    return X.as_strided((B, w, m), (n * n, n - 1, 1), X.storage_offset() + first * (n - 1) + w)


def eisner_charts(scores):
    """Backpointers (bp_i, bp_cr, bp_cl), each [B, n, n] int64 and diagonal-major: bp[:, w, s] is the split r chosen
    for cell [s, s + w]. bp_i serves I_R and I_L, which maximize over the same candidates.

    The tables are diagonal-major too, so for a width w the candidates of every start s and split are two strided
    views (one row block, one anti-diagonal block) added in one op, and their maximum over the split one reduction:
    O(n) torch ops per batch."""
    B, n, _ = scores.shape
    dev = scores.device
    ninf = float("-inf")
    cr = scores.new_full((B, n, n), ninf)
    cl = scores.new_full((B, n, n), ninf)
    ir = scores.new_full((B, n, n), ninf)
    il = scores.new_full((B, n, n), ninf)
    cr[:, 0] = 0
    cl[:, 0] = 0
    bp_i = torch.zeros((B, n, n), dtype=torch.int64, device=dev)
    bp_cr = torch.zeros_like(bp_i)
    bp_cl = torch.zeros_like(bp_i)
    starts = torch.arange(n, device=dev)
    for w in range(1, n):
        m = n - w
        s = starts[:m]
        # I[s, s + w]: r = s + k, k = 0 .. w - 1, over C_R[s, s + k] + C_L[s + k + 1, s + w]
        best, arg = (cr[:, :w, :m] + _antidiagonal(cl, w, m, 0).flip(1)).max(1)
        ir[:, w, :m] = best + torch.diagonal(scores, w, 1, 2)  # scores[s, s + w]: arc s -> s + w
        il[:, w, :m] = best + torch.diagonal(scores, -w, 1, 2)  # scores[s + w, s]: arc s + w -> s
        il[:, w, 0] = ninf  # the root never has a head
        bp_i[:, w, :m] = arg + s
        # C_R[s, s + w]: k = 1 .. w over I_R[s, s + k] + C_R[s + k, s + w]
        best, arg = (ir[:, 1:w + 1, :m] + _antidiagonal(cr, w, m, 0).flip(1)).max(1)
        cr[:, w, :m] = best
        bp_cr[:, w, :m] = arg + s + 1
        # C_L[s, s + w]: k = 0 .. w - 1 over C_L[s, s + k] + I_L[s + k, s + w]
        best, arg = (cl[:, :w, :m] + _antidiagonal(il, w, m, 1).flip(1)).max(1)
        cl[:, w, :m] = best
        bp_cl[:, w, :m] = arg + s
    return bp_i, bp_cr, bp_cl


def backtrack(bp_i, bp_cr, bp_cl, L):
    """Heads (a list of n ints, -1 for the root and past L) of one sentence from its diagonal-major [n, n]
    backpointer tables (numpy arrays), read from C_R[0, L - 1]."""
    n = len(bp_i)
    heads = [-1] * n
    stack = [(_CR, 0, L - 1)]
    while stack:
        kind, s, t = stack.pop()
        if s == t:
            continue
        if kind == _CR:
            r = int(bp_cr[t - s, s])
            stack.append((_IR, s, r))
            stack.append((_CR, r, t))
        elif kind == _CL:
            r = int(bp_cl[t - s, s])
            stack.append((_CL, s, r))
            stack.append((_IL, r, t))
        else:
            if kind == _IR:
                heads[t] = s
            else:
                heads[s] = t
            r = int(bp_i[t - s, s])
            stack.append((_CR, s, r))
            stack.append((_CL, r + 1, t))
    return heads


def eisner(scores, lengths):
    """Heads [B, n] int64 of the projective maximum spanning trees of float [B, n, n] scores (scores[b, h, d]:
    arc h -> d, index 0 the root), sentence b of length lengths[b] (an int64 [B] tensor counting the root)."""
    B, n, _ = scores.shape
    scores = scores.contiguous()
    bp_i, bp_cr, bp_cl = (t.cpu().numpy() for t in eisner_charts(scores))
    rows = [backtrack(bp_i[b], bp_cr[b], bp_cl[b], L) for b, L in enumerate(lengths.tolist())]
    return torch.tensor(rows, dtype=torch.int64, device=scores.device).reshape(B, n)


def mart(scores):
    """The top-down split tree of an [n, n] matrix (README.md): nested 2-tuples of word indices, a word its int.
    Float64 2-D prefix sums make each candidate cut O(1); the cuts of a span are scored in Python floats (IEEE
    doubles, as float64 tensors), which for sentence-sized spans is faster than launching tensor ops per span."""
    n = scores.shape[0]
    S = scores.detach().to(device="cpu", dtype=torch.float64)
    P = torch.zeros((n + 1, n + 1), dtype=torch.float64)
    P[1:, 1:] = S.cumsum(0).cumsum(1)
    P = P.tolist()

    def rect(r0, r1, c0, c1):  # S[r0:r1, c0:c1].sum()
        return P[r1][c1] - P[r0][c1] - P[r1][c0] + P[r0][c0]

    def cut(i, j):  # the best cut k of the span i..j (left i..k, right k+1..j), j > i; the first of equal maxima
        best, best_k = None, i
        for k in range(i, j):
            a, b = k + 1 - i, j - k  # |L|, |R|
            v = (rect(i, k + 1, i, k + 1) / (a * a) + rect(k + 1, j + 1, k + 1, j + 1) / (b * b)
                 - rect(i, k + 1, k + 1, j + 1) / (a * b) - rect(k + 1, j + 1, i, k + 1) / (b * a))
            if best is None or v > best:
                best, best_k = v, k
        return best_k

    # Iterative (no recursion limit on long inputs): cut spans top-down, then build the tuples bottom-up.
    cuts, order, todo = {}, [], [(0, n - 1)]
    while todo:
        i, j = todo.pop()
        if i == j:
            continue
        k = cuts[(i, j)] = cut(i, j)
        order.append((i, j))
        todo.append((i, k))
        todo.append((k + 1, j))
    built = {}
    for i, j in reversed(order):  # children are cut after their parent, so built before it here
        k = cuts[(i, j)]
        built[(i, j)] = (built.pop((i, k), i), built.pop((k + 1, j), j))
    return built.get((0, n - 1), 0)
