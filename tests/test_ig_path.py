"""The integrated-gradients path kernels ig_scale_inputs / ig_accumulate: every backend this machine runs (see
support.TARGETS) against the formulas evaluated in float64, over dtypes, shapes, layouts and options; opcheck of
each kernel op; torch.compile; the whole IG driver through each backend."""
import itertools

import pytest
import torch

import fastml
from fastml._numerics import acc_dtype
from fastml.testing import assert_close, assert_close_norm
from support import BF16, F16, F32, F64, ig_inputs, per_target, targets

BACKEND_NAMES = ("reference", "cpp", "triton", "cuda")


def scale_formula(x, xb, alphas):
    x, xb, a = x.double(), xb.double().expand(x.shape), alphas.double()
    return (xb + a.view(-1, *([1] * x.dim())) * (x - xb)).reshape(-1, *x.shape[1:])


def accumulate_formula(grads, x, xb, weights, multiply, acc=None):
    S = weights.shape[0]
    x, xb = x.double(), xb.double().expand(x.shape)
    total = (weights.double().view(S, *([1] * x.dim())) * grads.double().reshape(S, *x.shape)).sum(0)
    if acc is not None:
        total = total + acc.double()
    attr = total * (x - xb) if multiply else total
    return attr, attr.reshape(x.shape[0], -1).sum(1)


def _ops(target):
    suffix = "_triton" if target.backend == "triton" else ""
    return getattr(torch.ops.fastml, "ig_scale_inputs" + suffix), getattr(torch.ops.fastml, "ig_accumulate" + suffix)


SHAPES = {
    "cpu": [(1, 1), (3, 5), (2, 3, 7, 9), (4, 2100)],  # 2100 > one 2048-element tile of the C++ kernel
    # (1, 300000): more elements than the CUDA accumulate's 256 tiles of 1024 cover at once; (66000, 3) and
    # (66000, 4): many examples, on the one-wide and the four-wide path.
    "gpu": [(4, 3, 32, 32), (5, 7), (3,), (2, 1000, 13), (1, 4096), (1, 300000), (66000, 3), (66000, 4)],
}
SHAPES["interp"] = SHAPES["cpu"]
# (multiply_by_inputs, with a running sum, baselines broadcast from [1, ...]): a Latin square over shape x dtype,
# so each option value meets every shape and every dtype.
OPTIONS = [(True, False, False), (False, True, False), (True, True, True), (False, False, True)]


def _cases(kind):
    pairs = list(itertools.product(SHAPES[kind], (F32, F64, F16, BF16)))
    return [(shape, dtype) + OPTIONS[(i + i // 4) % 4] for i, (shape, dtype) in enumerate(pairs)]


CASES = {kind: _cases(kind) for kind in SHAPES}


@pytest.mark.parametrize("target,shape,dtype,multiply,with_acc,broadcast", per_target(CASES, op="ig"))
def test_matches_formula(target, shape, dtype, multiply, with_acc, broadcast):
    S = 5
    x, xb, alphas, grads = ig_inputs(shape, S, dtype, target.device, seed=len(shape))
    if broadcast:
        xb = xb[:1]
    scaled = fastml.ig_scale_inputs(x, xb, alphas, backend=target.backend)
    assert scaled.dtype == dtype
    # One rounding to the dtype of a value computed in the accumulation dtype.
    assert_close(scaled, scale_formula(x, xb, alphas), dtype=dtype, name="scaled inputs")
    acc = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=F64) if with_acc else None
    acc = None if acc is None else acc.to(target.device, acc_dtype(dtype))
    attr, sums = fastml.ig_accumulate(grads, x, xb, alphas, multiply_by_inputs=multiply, acc=acc, return_sums=True,
                                      backend=target.backend)
    want_attr, want_sums = accumulate_formula(grads, x, xb, alphas, multiply, acc)
    assert attr.dtype == sums.dtype == acc_dtype(dtype) and attr.shape == x.shape and sums.shape == (shape[0],)
    # Exact inputs (even half ones convert exactly) and S = 5 terms summed in the accumulation dtype.
    assert_close(attr, want_attr, dtype=acc_dtype(dtype), name="attributions")
    # The sums add up to 300000 elements per example, in tiles whose order differs from torch's.
    assert_close_norm(sums, want_sums, dtype=acc_dtype(dtype), name="sums")


def _layouts():
    """(name, inputs, baselines, grads) with S = 3 steps: dense, and the strided, offset or broadcast operands IG
    passes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1100, generator=g)
    grads = torch.randn(12, 1100, generator=g)
    offset = torch.randn(4 * 1100 + 1, generator=g)[1:].view(4, 1100)  # one element into its storage: unaligned
    return [
        ("dense", x, torch.randn(4, 1100, generator=g), grads),
        ("baseline [1, D]", x, torch.randn(1, 1100, generator=g), grads),
        ("0-d baseline", x, torch.tensor(0.25), grads),
        ("expanded zero baseline", x, torch.zeros(()).expand(4, 1100), grads),
        ("transposed inputs", torch.randn(1100, 4, generator=g).t(), torch.randn(1100, generator=g), grads),
        ("offset inputs", offset, torch.zeros(1100), grads),
        ("strided grads", x, torch.zeros(1100), torch.randn(1100, 12, generator=g).t()),
        ("expanded grads", x, torch.zeros(1100), torch.randn(12, 1, generator=g).expand(12, 1100)),
    ]


@pytest.mark.parametrize("case", _layouts(), ids=lambda c: c[0])
def test_layouts_match_formula_and_inputs_untouched(target, case):
    _, x, xb, grads = (c.to(target.device) if isinstance(c, torch.Tensor) else c for c in case)
    alphas = torch.tensor([0.1, 0.5, 0.9], device=target.device)
    before = [t.clone() for t in (x, xb, grads)]
    assert_close(fastml.ig_scale_inputs(x, xb, alphas, backend=target.backend), scale_formula(x, xb, alphas),
                 dtype=F32, name="scaled inputs")
    for mul in (True, False):
        attr, sums = fastml.ig_accumulate(grads, x, xb, alphas, multiply_by_inputs=mul, return_sums=True,
                                          backend=target.backend)
        want_attr, want_sums = accumulate_formula(grads, x, xb, alphas, mul)
        assert_close(attr, want_attr, dtype=F32, name="attributions")
        # Sums over 1100 elements, in another order than torch's.
        assert_close_norm(sums, want_sums, dtype=F32, name="sums")
    for t, b in zip((x, xb, grads), before):
        assert torch.equal(t, b)


def test_empty_steps_and_batch(target):
    x, xb, alphas, _ = ig_inputs((2, 3), 1, F32, target.device)
    assert fastml.ig_scale_inputs(x, xb, alphas[:0], backend=target.backend).shape == (0, 3)
    attr, sums = fastml.ig_accumulate(x[:0], x[:0], xb[:0], alphas, return_sums=True, backend=target.backend)
    assert attr.shape == (0, 3) and sums.shape == (0,)


def test_each_backend_serves_or_refuses_with_a_reason():
    # On CPU tensors every backend name either computes the formula or raises BackendUnavailable naming itself
    # and why; the ones that serve are exactly the CPU targets this suite runs.
    x, xb, alphas, grads = ig_inputs((3, 4), 2, F32)
    served = []
    for name in BACKEND_NAMES:
        try:
            attr = fastml.ig_accumulate(grads, x, xb, alphas, backend=name)
        except fastml.BackendUnavailable as exc:
            assert name in str(exc) and len(str(exc)) > len(name) + 20, str(exc)
            continue
        assert_close(attr, accumulate_formula(grads, x, xb, alphas, True)[0], name=name)
        served.append(name)
    assert served == [p.values[0].backend for p in targets(device="cpu")]
    assert "cuda" not in served  # no backend serves CPU tensors with CUDA kernels


@pytest.mark.parametrize("target", targets(kernels=True))
def test_opcheck(target):
    scale, accumulate = _ops(target)
    x, xb, alphas, grads = ig_inputs((3, 4), 2, F32, target.device)
    torch.library.opcheck(scale.default, (x, xb, alphas))
    acc = torch.randn(3, 4, device=target.device)
    for mul, a in [(True, None), (False, acc)]:
        torch.library.opcheck(accumulate.default, (grads, x, xb, alphas, mul, a))


@pytest.mark.parametrize("target", targets(kernels=True))
def test_path_kernels_compile_fullgraph(target):
    # Inductor for one backend (cpp where it is built), aot_eager for the others.
    inductor = target.backend == "cpp"
    x, xb, alphas, grads = ig_inputs((3, 5), 4, F32, target.device)

    def f(x, xb, grads):
        scaled = fastml.ig_scale_inputs(x, xb[:1], alphas, backend=target.backend)
        return fastml.ig_accumulate(grads + scaled, x, xb[:1], alphas, return_sums=True, backend=target.backend)

    got = torch.compile(f, fullgraph=True, backend="inductor" if inductor else "aot_eager")(x, xb, grads)
    for a, e in zip(got, f(x, xb, grads)):
        assert_close(a, e)


@pytest.mark.parametrize("target", targets(kernels=True))
def test_integrated_gradients_through_each_backend(target):
    # Tuple inputs (one of them a transposed view), default, scalar and broadcast baselines, and the model's own
    # gradients, through the whole driver.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(target.device)
    x = (torch.randn(5, 6, device=target.device), torch.randn(5, 2, 3, device=target.device).transpose(1, 2))

    def f(a, b):
        return model(a + b.sum(1).repeat(1, 3))

    for baselines in (None, (0.5, torch.randn(1, 3, 2, device=target.device))):
        got, d1 = fastml.integrated_gradients(f, x, baselines, target=1, n_steps=7, return_convergence_delta=True,
                                              backend=target.backend)
        want, d2 = fastml.integrated_gradients(f, x, baselines, target=1, n_steps=7, return_convergence_delta=True,
                                               backend="reference")
        for a, e in zip(got, want):
            assert_close(a, e, name="attributions")
        assert_close(d1, d2, name="delta")
