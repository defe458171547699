"""Sampling (sample, top_k_top_p_filter) over every backend this machine runs: the kept set of every filter against
a row-by-row brute force of the rules and against the sort-based reference (random and tie-heavy rows, to the
token), per-row parameters, keep_ids, the draw (same token as the reference for the same seed, never a filtered
token, a chi-square test of its distribution), generator handling, greedy decoding, log-probabilities, bad inputs,
opcheck and torch.compile."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastml
from fastml.ops.sampling import reference
from support import targets

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
INF = float("inf")


@pytest.fixture(params=targets(device="cpu"))
def target(request):
    """The CPU targets (this suite builds CPU tensors; the CUDA path has its own test at the end)."""
    return request.param


def _dtypes(target):
    return (F32, F64, F16) if target.backend == "triton" else (F32, F64, F16, BF16)


def _rows(B, V, dtype, seed, ties=False, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(0, 4, (B, V), generator=g).to(F64) * 0.5
    else:
        x = torch.randn(B, V, generator=g, dtype=F64) * 2
    if neg_inf and V > 1:
        x[torch.rand(B, V, generator=g) < 0.2] = -INF
        x[:, 0] = 0.25  # one finite value per row at least
    return x.to(dtype)


def _brute_kept(x, top_k, top_p, min_p, keep_ids):
    """The kept mask of one row by the written rules, with Python loops and value groups (x: the scaled row in the
    accumulation dtype)."""
    vals = [float(v) for v in x.tolist()]
    V = len(vals)
    cand = [i for i, v in enumerate(vals) if math.isfinite(v)]
    m = max(vals[i] for i in cand)
    if top_k and top_k < len(cand):
        kth = sorted((vals[i] for i in cand), reverse=True)[top_k - 1]
        cand = [i for i in cand if vals[i] >= kth]
    if top_p is not None and top_p < 1:
        d = torch.tensor([vals[i] - m for i in cand], dtype=F64)
        w = dict(zip(cand, reference.weights(d).tolist()))
        z = sum(w.values())
        keep, above = [], 0
        for v in sorted({vals[i] for i in cand}, reverse=True):
            group = [i for i in cand if vals[i] == v]
            if float(above) < top_p * float(z) or v == m:
                keep += group
                above += sum(w[i] for i in group)
            else:
                break
        cand = keep
    if min_p:
        cand = [i for i in cand if vals[i] - m >= math.log(min_p)]
    mask = torch.zeros(V, dtype=torch.bool)
    mask[cand] = True
    for i in keep_ids or ():
        mask[i] = True
    return mask


def _scaled(x, temperature):
    acc = F64 if x.dtype == F64 else F32
    return x.to(acc) / torch.tensor(temperature, dtype=F64).to(acc)


def _check_filter(target, x, **kw):
    """The target's filter against the brute force (kept set and values) and, for kernels, the reference (every
    element, bit for bit)."""
    out = fastml.top_k_top_p_filter(x, backend=target.backend, **kw)
    assert out.dtype == x.dtype and out.shape == x.shape
    xs = _scaled(x, kw.get("temperature", 1.0))
    for r in range(x.shape[0]):
        want = _brute_kept(xs[r], kw.get("top_k"), kw.get("top_p"), kw.get("min_p"), kw.get("keep_ids"))
        got = out[r] != -INF
        finite_kept = want & torch.isfinite(xs[r])
        assert torch.equal(got, finite_kept), f"row {r}: kept {got.nonzero().flatten().tolist()}, expected " \
                                              f"{finite_kept.nonzero().flatten().tolist()}"
        assert torch.equal(out[r][got], xs[r][got].to(x.dtype))
    if target.backend != "reference":
        ref = fastml.top_k_top_p_filter(x, backend="reference", **kw)
        assert torch.equal(out, ref)
    return out


FILTERS = [dict(), dict(top_k=1), dict(top_k=3), dict(top_p=0.5), dict(top_p=0.9), dict(top_p=0.0), dict(min_p=0.2),
           dict(top_k=4, top_p=0.6), dict(top_k=5, top_p=0.8, min_p=0.05, keep_ids=[0, 2]),
           dict(top_k=100), dict(temperature=0.6, top_p=0.7), dict(temperature=3.0, top_k=2, min_p=0.5)]


@pytest.mark.parametrize("kw", FILTERS, ids=[",".join(f"{k}={v}" for k, v in f.items()) or "none" for f in FILTERS])
@pytest.mark.parametrize("ties", [False, True])
def test_filter_kept_set(target, kw, ties):
    # the interpreter runs one dtype per case (cycling), the others all four
    dtypes = _dtypes(target)
    if target.kind == "interp":
        dtypes = dtypes[(len(kw) + ties) % len(dtypes):][:1]
    for dtype in dtypes:
        _check_filter(target, _rows(3, 37, dtype, seed=len(kw), ties=ties, neg_inf=ties), **kw)


@pytest.mark.parametrize("target", targets(device="cpu"))
@given(seed=st.integers(0, 2**20), V=st.integers(1, 40), ties=st.booleans(), neg_inf=st.booleans(),
       top_k=st.sampled_from([None, 0, 1, 2, 5, 17, 60]), top_p=st.sampled_from([None, 0.0, 0.1, 0.5, 0.8, 0.95, 1.0]),
       min_p=st.sampled_from([None, 0.0, 0.01, 0.3, 1.0]), temperature=st.sampled_from([1.0, 0.3, 2.5]),
       dtype=st.sampled_from([F32, F64, F16]))
@settings(max_examples=12)
def test_property_filter_kept_set(target, seed, V, ties, neg_inf, top_k, top_p, min_p, temperature, dtype):
    x = _rows(2, V, dtype, seed, ties=ties, neg_inf=neg_inf)
    _check_filter(target, x, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature)


def test_top_p_boundary_is_exact(target):
    """Weights 2^36, 2^35, 2^34, 2^34: the mass above the second token is exactly half the total, so top_p = 0.5
    stops at the first token (its cumulative mass reaches 0.5) and anything above 0.5 keeps the second too."""
    x = torch.tensor([[0.0, -0.69314, -1.38629, -1.38629]])
    w = reference.weights(x[0].double() - 0.0).tolist()
    assert w == [2**36, 2**35, 2**34, 2**34]
    for p, kept in [(0.5, [True, False, False, False]), (0.5000001, [True, True, False, False]),
                    (0.75, [True, True, False, False]), (0.7500001, [True, True, True, True])]:
        out = fastml.top_k_top_p_filter(x, top_p=p, backend=target.backend)
        assert (out[0] != -INF).tolist() == kept, p


def test_large_rows_match_the_reference(target):
    """Rows long enough for the cpp kernel's sampled top-k guess and its histogram path (V >= 8192)."""
    if target.backend == "triton":
        pytest.skip("the interpreter is too slow for 10^4-token rows; the bisection has no such path")
    for ties in (False, True):
        x = _rows(4, 9000, F32, seed=5, ties=ties)
        for kw in (dict(top_k=50, top_p=0.9), dict(top_k=3000), dict(top_p=0.3), dict(top_k=1, min_p=0.5)):
            got = fastml.top_k_top_p_filter(x, backend=target.backend, **kw)
            ref = fastml.top_k_top_p_filter(x, backend="reference", **kw)
            assert torch.equal(got, ref)
            for r in range(2):
                want = _brute_kept(x[r].float(), kw.get("top_k"), kw.get("top_p"), kw.get("min_p"), None)
                assert torch.equal(got[r] != -INF, want)
            t1 = fastml.sample(x, generator=torch.Generator().manual_seed(1), backend=target.backend, **kw)
            t2 = fastml.sample(x, generator=torch.Generator().manual_seed(1), backend="reference", **kw)
            assert torch.equal(t1, t2)


def test_per_row_tensor_parameters(target):
    x = _rows(4, 30, F32, seed=3)
    rows = dict(temperature=torch.tensor([0.5, 1.0, 2.0, 1.5]), top_k=torch.tensor([0, 3, 10, 1]),
                top_p=torch.tensor([0.9, 1.0, 0.4, 0.0]), min_p=torch.tensor([0.0, 0.1, 0.0, 0.3]))
    out = fastml.top_k_top_p_filter(x, backend=target.backend, **rows)
    tokens = fastml.sample(x, generator=torch.Generator().manual_seed(4), backend=target.backend, **rows)
    for r in range(4):
        one = {k: v[r].item() for k, v in rows.items()}
        assert torch.equal(out[r:r + 1], fastml.top_k_top_p_filter(x[r:r + 1], backend=target.backend, **one))
        assert out[r, tokens[r]] != -INF
    # a per-row temperature of 0 makes that row greedy
    t = torch.tensor([0.0, 1.0, 0.0, 1.0])
    tokens = fastml.sample(x, temperature=t, top_k=2, backend=target.backend)
    assert tokens[0] == x[0].argmax() and tokens[2] == x[2].argmax()


def test_keep_ids_are_kept_and_drawable(target):
    V = 20
    x = torch.zeros(16 if target.kind == "interp" else 400, V)
    x[:, 7] = 3.0
    x[:, 12] = 2.5  # the id to keep: below the top-1 cut, still likely
    x[:, 3] = -INF  # a kept -inf stays -inf and is never drawn
    for ids in ([12, 3], torch.tensor([3, 12, 12])):
        out = fastml.top_k_top_p_filter(x, top_k=1, keep_ids=ids, backend=target.backend)
        assert ((out != -INF).sum(1) == 2).all() and (out[:, 12] == 2.5).all() and (out[:, 3] == -INF).all()
        tokens = fastml.sample(x, top_k=1, keep_ids=ids, generator=torch.Generator().manual_seed(0),
                               backend=target.backend)
        drawn = set(tokens.tolist())
        assert drawn == {7, 12}, drawn
    # keep_ids that the filters kept anyway change nothing
    a = fastml.sample(x, top_k=2, keep_ids=[7], generator=torch.Generator().manual_seed(2), backend=target.backend,
                      return_logprobs=True)
    b = fastml.sample(x, top_k=2, generator=torch.Generator().manual_seed(2), backend=target.backend,
                      return_logprobs=True)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_draws_only_kept_tokens_and_match_the_reference(target):
    B = 8 if target.kind == "interp" else 256
    for ties in (False, True):
        x = _rows(B, 33, F32, seed=11, ties=ties)
        for kw in (dict(top_k=4), dict(top_p=0.6, temperature=0.8), dict(min_p=0.3, keep_ids=[0]),
                   dict(top_k=6, top_p=0.5)):
            out = fastml.top_k_top_p_filter(x, backend="reference", **kw)
            tokens, lp = fastml.sample(x, generator=torch.Generator().manual_seed(9), return_logprobs=True,
                                       backend=target.backend, **kw)
            assert tokens.dtype == torch.int64 and lp.dtype == F32 and tokens.shape == lp.shape == (B,)
            assert (out.gather(1, tokens[:, None]) != -INF).all(), "a filtered-out token was drawn"
            want = torch.log_softmax(out.double(), dim=1).gather(1, tokens[:, None])[:, 0]
            torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-5)
            ref = fastml.sample(x, generator=torch.Generator().manual_seed(9), backend="reference", **kw)
            assert torch.equal(tokens, ref), "the same seed must draw the same tokens on every backend"


# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46}


@pytest.mark.parametrize("kw", [dict(top_k=4), dict(top_p=0.9, temperature=1.5), dict(min_p=0.05, keep_ids=[5])])
def test_draws_follow_the_filtered_distribution(target, kw):
    if target.kind == "interp" and len(kw) > 1:
        pytest.skip("the interpreter runs one case (its draws equal the reference's, token for token, elsewhere)")
    n = 120 if target.kind == "interp" else 30000
    row = torch.tensor([1.0, 2.0, 0.5, -1.0, 3.0, -2.0, 0.0])
    x = row.expand(n, -1).contiguous()
    probs = torch.softmax(fastml.top_k_top_p_filter(row[None], backend="reference", **kw).double(), dim=1)[0]
    support = probs > 0
    df = int(support.sum()) - 1
    assert df >= 3
    tokens = fastml.sample(x, generator=torch.Generator().manual_seed(123), backend=target.backend, **kw)
    counts = torch.bincount(tokens, minlength=7).double()
    assert (counts[~support] == 0).all()
    expected = probs[support] * n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[df], f"chi2 = {chi2:.2f} with {df} degrees of freedom"


def test_seeds_and_generators(target):
    x = _rows(4 if target.kind == "interp" else 16, 50, F32, seed=1)
    g = torch.Generator().manual_seed(7)
    a = fastml.sample(x, top_p=0.95, generator=g, backend=target.backend)
    b = fastml.sample(x, top_p=0.95, generator=g, backend=target.backend)
    assert not torch.equal(a, b), "each call must advance the generator"
    g.manual_seed(7)
    assert torch.equal(fastml.sample(x, top_p=0.95, generator=g, backend=target.backend), a)
    # torch's default generator when none is given
    torch.manual_seed(5)
    c = fastml.sample(x, backend=target.backend)
    d = fastml.sample(x, backend=target.backend)
    torch.manual_seed(5)
    assert torch.equal(fastml.sample(x, backend=target.backend), c) and not torch.equal(c, d)


def test_greedy_at_temperature_zero(target):
    x = torch.tensor([[0.0, 2.0, 1.0, 2.0], [-INF, -1.0, -1.0, -INF], [5.0, 5.0, 5.0, 5.0]])
    for dtype in _dtypes(target):
        tokens, lp = fastml.sample(x.to(dtype), temperature=0, top_k=1, top_p=0.1, keep_ids=[0],
                                   return_logprobs=True, backend=target.backend)
        assert tokens.tolist() == [1, 1, 0] and lp.tolist() == [0.0, 0.0, 0.0]


def test_single_token_rows_and_certain_draws(target):
    x = torch.tensor([[0.3], [-2.0]])
    tokens, lp = fastml.sample(x, top_p=0.5, return_logprobs=True, backend=target.backend)
    assert tokens.tolist() == [0, 0] and lp.abs().max() < 1e-6
    y = torch.tensor([[0.0, -INF, 1.0, -INF]])
    assert fastml.sample(y, top_k=1, backend=target.backend).tolist() == [2]


def test_inputs_are_not_modified(target):
    x = _rows(3, 25, F32, seed=2)
    before = x.clone()
    t = torch.tensor([1.0, 0.5, 2.0])
    t0 = t.clone()
    fastml.top_k_top_p_filter(x, temperature=t, top_k=3, top_p=0.5, keep_ids=[1], backend=target.backend)
    fastml.sample(x, temperature=t, top_k=3, top_p=0.5, min_p=0.1, return_logprobs=True, backend=target.backend)
    assert torch.equal(x, before) and torch.equal(t, t0)


@pytest.mark.parametrize("fn", ["sample", "top_k_top_p_filter"])
def test_bad_inputs(target, fn):
    f = getattr(fastml, fn)
    x = torch.randn(3, 10)
    run = lambda y=x, **kw: f(y, backend=target.backend, **kw)  # noqa: E731
    nan = x.clone()
    nan[1, 4] = float("nan")
    with pytest.raises(ValueError, match="logits row 1 contains NaN"):
        run(nan)
    dead = x.clone()
    dead[2] = -INF
    with pytest.raises(ValueError, match="logits row 2 has no finite value"):
        run(dead)
    pinf = x.clone()
    pinf[0, 0] = INF
    with pytest.raises(ValueError, match=r"logits row 0 contains \+inf"):
        run(pinf)
    for kw, name in [(dict(temperature=-1.0), "temperature"), (dict(temperature=torch.tensor([1.0, -1.0, 1.0])),
                                                                "temperature"),
                     (dict(top_k=-1), "top_k"), (dict(top_k=torch.tensor([1, -2, 3])), "top_k"),
                     (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"), (dict(top_p=torch.full((3,), 2.0)),
                                                                              "top_p"),
                     (dict(min_p=-0.5), "min_p"), (dict(min_p=torch.tensor([0.0, 1.2, 0.0])), "min_p"),
                     (dict(temperature=float("nan")), "temperature"), (dict(top_k=torch.tensor([1, 2])), "top_k")]:
        with pytest.raises(ValueError, match=name):
            run(**kw)
    if fn == "top_k_top_p_filter":
        with pytest.raises(ValueError, match="temperature"):
            run(temperature=0)
    for ids in ([10], [-1], torch.tensor([0, 12])):
        with pytest.raises(IndexError, match="keep_ids"):
            run(keep_ids=ids)
    for kw, name in [(dict(top_k=2.5), "top_k"), (dict(top_p="a"), "top_p"), (dict(keep_ids=[1.5]), "keep_ids"),
                     (dict(temperature=torch.tensor([1, 1, 1])), "temperature"),
                     (dict(keep_ids=torch.tensor([1.0])), "keep_ids")]:
        with pytest.raises(TypeError, match=name):
            run(**kw)
    with pytest.raises(TypeError, match="logits"):
        run(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits"):
        run(torch.randn(10))


def test_generator_checks():
    x = torch.randn(2, 5)
    with pytest.raises(TypeError, match="generator"):
        fastml.sample(x, generator=3)
    with pytest.raises(TypeError, match="return_logprobs"):
        fastml.sample(x, return_logprobs=1)
    with pytest.raises(TypeError, match="filter_value"):
        fastml.top_k_top_p_filter(x, filter_value=None)


def test_filter_value_and_empty_batch(target):
    x = torch.tensor([[1.0, -INF, 3.0, 2.0]])
    out = fastml.top_k_top_p_filter(x, top_k=2, filter_value=-1e4, backend=target.backend)
    assert out.tolist() == [[-1e4, -1e4, 3.0, 2.0]]
    empty = torch.empty(0, 5)
    assert fastml.top_k_top_p_filter(empty, backend=target.backend).shape == (0, 5)
    tokens, lp = fastml.sample(empty, return_logprobs=True, backend=target.backend)
    assert tokens.shape == lp.shape == (0,)


def _ops(target):
    suffix = "_triton" if target.backend == "triton" else ""
    return (getattr(torch.ops.fastml, "sampling_filter" + suffix),
            getattr(torch.ops.fastml, "sampling_sample" + suffix))


def _op_args(B=3, V=9):
    x = torch.randn(B, V)
    return (x, torch.full((B,), 0.8, dtype=F64), torch.tensor([0, 3, 5])[:B],
            torch.tensor([0.9, 1.0, 0.5], dtype=F64)[:B], torch.log(torch.tensor([0.0, 0.1, 0.0], dtype=F64))[:B],
            torch.tensor([1], dtype=torch.int64))


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu"))
def test_opcheck(target):
    filt, samp = _ops(target)
    args = _op_args()
    torch.library.opcheck(filt.default, args + (float("-inf"),))
    seed = torch.tensor([12345], dtype=torch.int64)
    torch.library.opcheck(samp.default, args + (seed, True))
    torch.library.opcheck(samp.default, args + (seed, False))


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu"))
def test_kernel_op_rejects_bad_arguments(target):
    filt, samp = _ops(target)
    x, t, k, p, lmp, ids = _op_args()
    with pytest.raises((ValueError, RuntimeError), match="top_k"):
        filt(x, t, k[:2], p, lmp, ids, 0.0)
    with pytest.raises((IndexError, RuntimeError), match="keep_ids"):
        filt(x, t, k, p, lmp, torch.tensor([9]), 0.0)
    with pytest.raises((ValueError, RuntimeError), match="seed"):
        samp(x, t, k, p, lmp, ids, torch.tensor([1.0]), False)


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu"))
def test_torch_compile(target):
    x = _rows(4, 40, F32, seed=8)

    def f(x):
        return fastml.top_k_top_p_filter(x, temperature=0.7, top_k=5, top_p=0.8, backend=target.backend) * 2

    assert torch.equal(torch.compile(f, backend="aot_eager")(x), f(x))

    def s(x, g):
        tokens, lp = fastml.sample(x, top_k=5, top_p=0.8, generator=g, return_logprobs=True, backend=target.backend)
        return tokens + 1, lp

    got = torch.compile(s, backend="eager")(x, torch.Generator().manual_seed(3))
    want = s(x, torch.Generator().manual_seed(3))
    assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1])


def test_auto_picks_a_kernel_on_cpu():
    assert fastml.backends(op="sample")["reference"][0]
    x = _rows(2, 20, F32, seed=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(fastml.sample(x, top_k=3, generator=g),
                       fastml.sample(x, top_k=3, generator=g.manual_seed(0), backend="reference"))


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu")[:1])
def test_cpu_results_do_not_depend_on_the_thread_count(target):
    x = _rows(6, 9000, F32, seed=4)
    before = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append((fastml.top_k_top_p_filter(x, top_k=40, top_p=0.8, backend=target.backend),
                        fastml.sample(x, top_p=0.9, generator=torch.Generator().manual_seed(0), return_logprobs=True,
                                      backend=target.backend)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1][0], out[1][1][0]) and torch.equal(out[0][1][1], out[1][1][1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cuda_auto_matches_reference(dtype):
    """What auto runs on CUDA (triton) against the reference: the kept set to the token, the same draws."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for ties in (False, True):
        x = (torch.randint(0, 5, (64, 32000), device="cuda", generator=g).float() if ties
             else torch.randn(64, 32000, device="cuda", generator=g) * 3).to(dtype)
        for kw in (dict(top_k=50, top_p=0.9), dict(top_p=0.5, temperature=0.7), dict(min_p=0.1, keep_ids=[0])):
            assert torch.equal(fastml.top_k_top_p_filter(x, **kw), fastml.top_k_top_p_filter(x, backend="reference",
                                                                                               **kw))
            a, la = fastml.sample(x, generator=torch.Generator(device="cuda").manual_seed(1), return_logprobs=True,
                                  **kw)
            b, lb = fastml.sample(x, generator=torch.Generator(device="cuda").manual_seed(1), return_logprobs=True,
                                  backend="reference", **kw)
            assert torch.equal(a, b)
            torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
