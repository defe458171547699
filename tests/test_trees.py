"""Tree decoders (fastml.ops.trees, public in fastml.probe): eisner on every backend it registers against a brute
force over all projective trees (n <= 7, batched with mixed lengths), cpp against the reference at larger n and on
tie-heavy scores (the tie rule is the same on both), -inf arcs, half inputs, opcheck of fastml::eisner, bad inputs;
mart against a direct O(n^3) implementation (random and tie cases) and its bad inputs."""
import functools
import itertools

import pytest
import torch

import fastml
from fastml.ops.trees import eisner, mart

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
BACKENDS = [name for name, (ok, _) in fastml.backends(op="eisner").items() if ok]
KERNELS = [name for name in BACKENDS if name != "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ---------------------------------------------------------------------------------------------------------------
# brute force


def _is_descendant(heads, k, h):
    """Whether word k lies in the subtree of h (k itself included)."""
    while k != -1:
        if k == h:
            return True
        k = heads[k]
    return False


@functools.lru_cache(maxsize=None)
def _projective_trees(L):
    """Every head assignment of a sentence of length L (root 0 included) that is a tree rooted at 0 and projective
    (each word strictly between an arc's ends descends from its head): an int64 [T, L] tensor."""
    out = []
    for choice in itertools.product(range(L), repeat=L - 1):
        heads = (-1,) + choice
        if any(heads[d] == d for d in range(1, L)):
            continue
        tree = True
        for d in range(1, L):  # every word reaches the root without a cycle
            seen, x = set(), d
            while x != 0:
                if x in seen:
                    tree = False
                    break
                seen.add(x)
                x = heads[x]
            if not tree:
                break
        if not tree:
            continue
        if all(_is_descendant(heads, k, heads[d]) for d in range(1, L)
               for k in range(min(d, heads[d]) + 1, max(d, heads[d]))):
            out.append(heads)
    return torch.tensor(out, dtype=torch.int64).reshape(len(out), L)


def _tree_scores(S, trees):
    """Score of each tree (rows of heads) under the [L, L] scores S, in float64."""
    L = trees.shape[1]
    if L == 1:
        return torch.zeros(1, dtype=F64)
    return S.to(F64)[trees[:, 1:], torch.arange(1, L)].sum(-1)


def _check_against_brute_force(S, heads):
    """heads is a projective tree of maximum score under S; it is the tree when the maximum is unique."""
    L = S.shape[0]
    trees = _projective_trees(L)
    scores = _tree_scores(S, trees)
    best = scores.max()
    assert (trees == heads[None]).all(1).any(), f"{heads.tolist()} is not a projective tree"
    got = _tree_scores(S, heads[None])[0]
    assert abs(float(got) - float(best)) <= 1e-9 * (1 + abs(float(best))), (float(got), float(best))
    top = (scores >= best - 1e-9 * (1 + abs(float(best)))).nonzero().flatten()
    if len(top) == 1:
        assert torch.equal(heads, trees[top[0]])
    return len(top)


def test_brute_force_counts_the_projective_trees():
    # projective dependency trees over n words with one artificial root in front, several root children allowed:
    # 1, 1, 3, 12, 55, 273 for n = 0 .. 5 words (the generalised Catalan numbers C(3n, n) / (2n + 1))
    assert [_projective_trees(L).shape[0] for L in range(1, 7)] == [1, 1, 3, 12, 55, 273]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_eisner_equals_brute_force(backend, n):
    g = torch.Generator().manual_seed(n)
    unique = 0
    for _ in range(4):
        S = torch.randn(n, n, generator=g, dtype=F64)
        heads = eisner(S, backend=backend)
        assert heads.shape == (n,) and heads.dtype == torch.int64 and heads[0] == -1
        unique += _check_against_brute_force(S, heads) == 1
    assert unique == 4  # random scores: the maximum was unique, so the heads themselves were compared


def test_eisner_batch_with_mixed_lengths(backend):
    n = 7
    g = torch.Generator().manual_seed(7)
    S = torch.randn(5, n, n, generator=g, dtype=F64)
    lengths = torch.tensor([7, 3, 1, 5, 6])
    S[1, 3:, :] = float("nan")  # padding is never read, whatever it holds
    S[3, :, 5:] = float("inf")
    before = S.clone()
    heads = eisner(S, lengths, backend=backend)
    assert torch.equal(S.isnan(), before.isnan()) and torch.equal(S.nan_to_num(), before.nan_to_num())
    assert heads.shape == (5, n)
    for b, L in enumerate(lengths.tolist()):
        assert (heads[b, L:] == -1).all() and heads[b, 0] == -1
        _check_against_brute_force(S[b, :L, :L], heads[b, :L])
        single = eisner(S[b, :L, :L].contiguous(), backend=backend)
        assert torch.equal(single, heads[b, :L])
    # the same lengths as a list, and as a single matrix with an int length
    assert torch.equal(eisner(S, lengths.tolist(), backend=backend), heads)
    assert torch.equal(eisner(S[3], 5, backend=backend), heads[3])


def test_eisner_empty_batch_and_strided_scores(backend):
    assert eisner(torch.zeros(0, 4, 4), backend=backend).shape == (0, 4)
    assert eisner(torch.zeros(0, 4, 4), torch.zeros(0, dtype=torch.int64), backend=backend).shape == (0, 4)
    S = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    transposed = S.transpose(1, 2)
    heads = eisner(transposed, backend=backend)
    assert torch.equal(heads, eisner(transposed.contiguous(), backend=backend))
    for b in range(3):
        _check_against_brute_force(transposed[b], heads[b])


def test_eisner_ties_reach_the_maximum(backend):
    g = torch.Generator().manual_seed(3)
    for n in (4, 6, 7):
        for _ in range(3):
            S = torch.randint(0, 2, (n, n), generator=g).to(F64)
            _check_against_brute_force(S, eisner(S, backend=backend))
        _check_against_brute_force(torch.zeros(n, n, dtype=F64), eisner(torch.zeros(n, n), backend=backend))


def test_eisner_all_equal_scores_follow_the_tie_rule(backend):
    # every tree ties; the smallest split everywhere gives the right-branching chain 0 -> 1 -> 2 -> ...
    heads = eisner(torch.zeros(6, 6), backend=backend)
    assert heads.tolist() == [-1, 0, 1, 2, 3, 4]


def test_eisner_forbidden_arcs(backend):
    g = torch.Generator().manual_seed(11)
    S = torch.randn(6, 6, generator=g, dtype=F64)
    heads = eisner(S, backend=backend)
    d = 3
    S[heads[d], d] = float("-inf")  # forbid the arc the decoder chose for word 3
    again = eisner(S, backend=backend)
    assert again[d] != heads[d]
    _check_against_brute_force(S.clamp_min(-1e9), again)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_eisner_half_scores_decode_in_float32(backend, dtype):
    S = torch.randn(3, 9, 9, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert torch.equal(eisner(S, backend=backend), eisner(S.float(), backend=backend))


def test_eisner_reports_its_backends():
    reported = fastml.backends(op="eisner")
    assert "reference" in reported and "cpp" in reported and "triton" not in reported
    with pytest.raises(fastml.BackendUnavailable, match="no triton"):
        eisner(torch.zeros(3, 3), backend="triton")


# ---------------------------------------------------------------------------------------------------------------
# cpp against the reference


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("n", [20, 50])
def test_kernel_equals_reference(kernel, dtype, n):
    g = torch.Generator().manual_seed(n)
    B = 6
    lengths = torch.tensor([n, 1, 2, n // 2, n - 1, 7])
    cases = {
        "random": torch.randn(B, n, n, generator=g, dtype=dtype) * 3,
        "integers 0..2": torch.randint(0, 3, (B, n, n), generator=g).to(dtype),
        "zeros": torch.zeros(B, n, n, dtype=dtype),
        "integers with -inf": torch.randint(0, 2, (B, n, n), generator=g).to(dtype).masked_fill(
            torch.rand(B, n, n, generator=g) < 0.3, float("-inf")),
    }
    for name, S in cases.items():
        for lens in (None, lengths):
            ref = eisner(S, lens, backend="reference")
            got = eisner(S, lens, backend=kernel)
            assert torch.equal(got, ref), name


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_every_tree_is_valid_and_optimal_at_n_7(kernel):
    g = torch.Generator().manual_seed(5)
    S = torch.randint(-2, 3, (16, 7, 7), generator=g).to(F32)
    lengths = torch.randint(1, 8, (16,), generator=g)
    heads = eisner(S, lengths, backend=kernel)
    assert torch.equal(heads, eisner(S, lengths, backend="reference"))
    for b, L in enumerate(lengths.tolist()):
        _check_against_brute_force(S[b, :L, :L], heads[b, :L])


@pytest.mark.skipif("cpp" not in KERNELS, reason="fastml._C is not built")
def test_eisner_opcheck():
    op = torch.ops.fastml.eisner
    g = torch.Generator().manual_seed(0)
    for dtype in (F32, F64):
        S = torch.randn(3, 8, 8, generator=g, dtype=dtype)
        torch.library.opcheck(op.default, (S, torch.tensor([8, 3, 1])))
    with pytest.raises(RuntimeError, match="lengths"):
        op(torch.zeros(2, 4, 4), torch.tensor([4, 5]))
    with pytest.raises(RuntimeError, match="NaN"):
        op(torch.full((1, 4, 4), float("nan")), torch.tensor([4]))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(torch.zeros(1, 4, 4, dtype=F16), torch.tensor([4]))


# ---------------------------------------------------------------------------------------------------------------
# eisner: bad inputs


def test_eisner_bad_inputs():
    S = torch.zeros(2, 4, 4)
    with pytest.raises(TypeError, match="scores"):
        eisner([[0.0]])
    with pytest.raises(TypeError, match="scores"):
        eisner(torch.zeros(2, 4, 4, dtype=torch.int64))
    for bad in (torch.zeros(4), torch.zeros(1, 2, 4, 4)):
        with pytest.raises(ValueError, match="scores"):
            eisner(bad)
    with pytest.raises(ValueError, match="scores"):
        eisner(torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="scores"):
        eisner(torch.zeros(2, 0, 0))
    for bad in (torch.tensor([4]), torch.tensor([[4, 4]]), [4, 4, 4]):
        with pytest.raises(ValueError, match="lengths"):
            eisner(S, bad)
    for bad in (torch.tensor([0, 4]), torch.tensor([4, 5]), [4, -1]):
        with pytest.raises(ValueError, match="lengths"):
            eisner(S, bad)
    with pytest.raises(TypeError, match="lengths"):
        eisner(S, torch.tensor([4.0, 4.0]))
    with pytest.raises(TypeError, match="lengths"):
        eisner(S[0], [4])
    with pytest.raises(ValueError, match="lengths"):
        eisner(S[0], 5)
    for value in (float("nan"), float("inf")):
        bad = S.clone()
        bad[1, 2, 3] = value
        with pytest.raises(ValueError, match="scores"):
            eisner(bad)
        eisner(bad, [4, 2])  # past sentence 1's length: ignored
    with pytest.raises(ValueError, match="backend"):
        eisner(S, backend="fast")


# ---------------------------------------------------------------------------------------------------------------
# mart


def _mart_direct(S):
    """Recomputes every mean directly for every cut: O(n^3) per split level."""
    S = S.to(F64)

    def split(i, j):
        if i == j:
            return i
        best, best_k = None, None
        for k in range(i, j):
            L, R = slice(i, k + 1), slice(k + 1, j + 1)
            v = S[L, L].mean() + S[R, R].mean() - S[L, R].mean() - S[R, L].mean()
            if best is None or v > best:
                best, best_k = v, k
        return (split(i, best_k), split(best_k + 1, j))

    return split(0, S.shape[0] - 1)


def _leaves(tree):
    out, stack = [], [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, int):
            out.append(x)
        else:
            assert isinstance(x, tuple) and len(x) == 2
            stack.extend(reversed(x))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_mart_equals_direct(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(3):
        S = torch.randn(n, n, generator=g, dtype=F64)
        before = S.clone()
        tree = mart(S)
        assert torch.equal(S, before)
        assert tree == _mart_direct(S)
        assert _leaves(tree) == list(range(n))


def test_mart_float32_input_matches_direct_on_its_float64_values():
    S = torch.randn(11, 11, generator=torch.Generator().manual_seed(2))
    assert mart(S) == _mart_direct(S.to(F64))


@pytest.mark.parametrize("n", [4, 7, 10])
def test_mart_ties(n):
    g = torch.Generator().manual_seed(100 + n)
    zeros = mart(torch.zeros(n, n))
    assert zeros == _mart_direct(torch.zeros(n, n))
    chain = n - 1
    for i in range(n - 2, -1, -1):
        chain = (i, chain)
    assert zeros == chain  # all cuts tie: the smallest k each time
    for _ in range(4):
        S = torch.randint(0, 2, (n, n), generator=g).to(F64)
        assert mart(S) == _mart_direct(S)
    block = torch.zeros(n, n)
    block[: n // 2, : n // 2] = 1
    block[n // 2:, n // 2:] = 1
    tree = mart(block)
    assert tree == _mart_direct(block) and _leaves(tree[0]) == list(range(n // 2))


def test_mart_long_input_has_no_recursion_limit():
    tree = mart(torch.zeros(1100, 1100, dtype=F64))
    assert _leaves(tree) == list(range(1100))


def test_mart_bad_inputs():
    with pytest.raises(TypeError, match="scores"):
        mart([[1.0]])
    with pytest.raises(TypeError, match="scores"):
        mart(torch.zeros(3, 3, dtype=torch.int32))
    for bad in (torch.zeros(3), torch.zeros(2, 3, 3), torch.zeros(3, 4), torch.zeros(0, 0)):
        with pytest.raises(ValueError, match="scores"):
            mart(bad)
    for value in (float("nan"), float("inf")):
        S = torch.zeros(3, 3)
        S[0, 1] = value
        with pytest.raises(ValueError, match="scores"):
            mart(S)
