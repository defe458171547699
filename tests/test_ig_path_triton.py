"""The Triton integrated-gradients path ops against the same formulas in plain torch (interpreter on CPU, or GPU)."""
import pytest
import torch

import fastml
from fastml._backend import triton_import_error, triton_interpret
from fastml.testing import assert_close

pytestmark = pytest.mark.skipif(triton_import_error() is not None or not triton_interpret(),
                                reason="needs triton with TRITON_INTERPRET=1 (CPU tensors)")

DTYPES = (torch.float32, torch.float16, torch.float64)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _data(shape, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    xb = (torch.randn(shape, generator=g) * 0.1).to(dtype)
    alphas = torch.rand(S, generator=g, dtype=torch.float64).to(_acc(dtype))
    grads = torch.randn((S * shape[0],) + shape[1:], generator=g).to(dtype)
    return x, xb, alphas, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,S", [((3, 5, 7), 4), ((2, 1500), 3), ((1, 1), 1)])
def test_scale_inputs(dtype, shape, S):
    x, xb, alphas, _ = _data(shape, S, dtype)
    got = torch.ops.fastml.ig_scale_inputs_triton(x, xb, alphas)
    a = alphas.to(_acc(dtype)).view(S, *([1] * len(shape)))
    want = (xb.to(a.dtype) + a * (x.to(a.dtype) - xb.to(a.dtype))).reshape((S * shape[0],) + shape[1:])
    assert got.dtype == dtype
    assert_close(got, want.to(dtype), dtype=dtype, name="scaled inputs")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("multiply", [True, False])
@pytest.mark.parametrize("with_acc", [True, False])
@pytest.mark.parametrize("shape,S", [((3, 5, 7), 4), ((2, 2100), 3)])
def test_accumulate(dtype, multiply, with_acc, shape, S):
    x, xb, weights, grads = _data(shape, S, dtype, seed=1)
    acc_dt = _acc(dtype)
    acc = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(acc_dt) if with_acc else None
    attr, sums = torch.ops.fastml.ig_accumulate_triton(grads, x, xb, weights, multiply, acc)
    g = grads.to(torch.float64).reshape(S, shape[0], -1)
    total = (weights.double()[:, None, None] * g).sum(0)
    if acc is not None:
        total = total + acc.double().reshape(shape[0], -1)
    if multiply:
        total = total * (x.double() - xb.double()).reshape(shape[0], -1)
    assert attr.dtype == acc_dt and sums.dtype == acc_dt
    assert_close(attr, total.reshape(shape), dtype=acc_dt, name="attributions")
    assert_close(sums, total.sum(1), dtype=acc_dt, name="sums")


def test_empty_steps_and_batch():
    x, xb, alphas, _ = _data((2, 3), 1, torch.float32)
    assert torch.ops.fastml.ig_scale_inputs_triton(x, xb, alphas[:0]).shape == (0, 3)
    attr, sums = torch.ops.fastml.ig_accumulate_triton(x[:0], x[:0], xb[:0], alphas, True, None)
    assert attr.shape == (0, 3) and sums.shape == (0,)


def test_opcheck():
    x, xb, alphas, grads = _data((2, 3, 4), 2, torch.float32)
    torch.library.opcheck(torch.ops.fastml.ig_scale_inputs_triton.default, (x, xb, alphas))
    torch.library.opcheck(torch.ops.fastml.ig_accumulate_triton.default, (grads, x, xb, alphas, True, None))


def _layouts():
    """(name, inputs, baselines, grads) with S = 3 steps: dense, and the strided or broadcast operands IG passes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1100, generator=g)
    grads = torch.randn(12, 1100, generator=g)
    return [
        ("dense", x, torch.randn(4, 1100, generator=g), grads),
        ("baseline [1, D]", x, torch.randn(1, 1100, generator=g), grads),
        ("0-d baseline", x, torch.tensor(0.25), grads),
        ("expanded zero baseline", x, torch.zeros(()).expand(4, 1100), grads),
        ("transposed inputs", torch.randn(1100, 4, generator=g).t(), torch.randn(1100, generator=g), grads),
        ("strided grads", x, torch.zeros(1100), torch.randn(1100, 12, generator=g).t()),
        ("expanded grads", x, torch.zeros(1100), torch.randn(12, 1, generator=g).expand(12, 1100)),
    ]


@pytest.mark.parametrize("case", _layouts(), ids=lambda c: c[0])
def test_layouts_match_reference(case):
    _, x, xb, grads = case
    alphas = torch.tensor([0.1, 0.5, 0.9])
    before = [t.clone() for t in (x, xb, grads)]
    for backend in ("triton", "cpp"):
        assert_close(fastml.ig_scale_inputs(x, xb, alphas, backend=backend),
                     fastml.ig_scale_inputs(x, xb, alphas, backend="reference"), name=f"{backend} scaled")
        got = fastml.ig_accumulate(grads, x, xb, alphas, return_sums=True, backend=backend)
        want = fastml.ig_accumulate(grads, x, xb, alphas, return_sums=True, backend="reference")
        assert_close(got[0], want[0], name=f"{backend} attributions")
        assert_close(got[1], want[1], rtol=1e-4, name=f"{backend} sums")
    for t, b in zip((x, xb, grads), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_integrated_gradients_through_each_backend(backend):
    # The driver passes broadcast baselines (None and scalars become expanded zeros) and the model's gradients.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = (torch.randn(5, 6), torch.randn(5, 2, 3).transpose(1, 2))

    def f(a, b):
        return model(a + b.sum(1).repeat(1, 3))

    for baselines in (None, (0.5, torch.randn(1, 3, 2))):
        got, d1 = fastml.integrated_gradients(f, x, baselines, target=1, n_steps=7, return_convergence_delta=True,
                                              backend=backend)
        want, d2 = fastml.integrated_gradients(f, x, baselines, target=1, n_steps=7, return_convergence_delta=True,
                                               backend="reference")
        for a, e in zip(got, want):
            assert_close(a, e, name=f"{backend} attributions")
        assert_close(d1, d2, atol=1e-5, name=f"{backend} delta")
