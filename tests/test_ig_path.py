"""The IG path kernels ig_scale_inputs / ig_accumulate: every CPU backend against the reference and the maths."""
import pytest
import torch

import fastml
from fastml import _backend
from fastml._backend import triton_cpu_error
from fastml.testing import assert_close

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 5), (2, 3, 7, 9), (4, 2100)]  # 2100 > one 2048-element tile of the C++ kernel


def _cpp_or_skip():
    reason = _backend.op_backends("ig_accumulate")["cpp"].why_not(_backend.Call(torch.device("cpu"), torch.float32))
    if reason is not None:
        pytest.skip(reason)


def _data(shape, dtype, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    xb = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = torch.randn(S * shape[0], *shape[1:], generator=g, dtype=torch.float64)
    alphas = torch.rand(S, generator=g, dtype=torch.float64)
    weights = torch.rand(S, generator=g, dtype=torch.float64)
    return x.to(dtype), xb.to(dtype), grads.to(dtype), alphas, weights


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_the_formula(shape, dtype):
    S = 3
    x, xb, grads, alphas, weights = _data(shape, dtype, S)
    scaled = fastml.ig_scale_inputs(x, xb, alphas, backend="reference")
    for s in range(S):
        expected = xb.double() + alphas[s] * (x.double() - xb.double())
        assert_close(scaled[s * shape[0]:(s + 1) * shape[0]], expected.to(dtype), dtype=dtype)
    attr, sums = fastml.ig_accumulate(grads, x, xb, weights, return_sums=True, backend="reference")
    total = sum(weights[s] * grads[s * shape[0]:(s + 1) * shape[0]].double() for s in range(S))
    expected = total * (x.double() - xb.double())
    assert attr.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(attr, expected, dtype=dtype)
    assert_close(sums, expected.reshape(shape[0], -1).sum(1), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mul", [True, False])
@pytest.mark.parametrize("with_acc", [False, True])
def test_cpp_matches_reference(shape, dtype, mul, with_acc):
    _cpp_or_skip()
    S = 5
    x, xb, grads, alphas, weights = _data(shape, dtype, S, seed=1)
    ad = torch.float64 if dtype == torch.float64 else torch.float32
    acc = torch.randn(shape, dtype=ad) if with_acc else None
    for backend_args in [(x, xb), (x, xb[:1])]:  # full baselines and baselines broadcast over the batch
        got = fastml.ig_scale_inputs(*backend_args, alphas, backend="cpp")
        ref = fastml.ig_scale_inputs(*backend_args, alphas, backend="reference")
        assert got.dtype == dtype
        assert_close(got, ref, dtype=dtype)
        got_a, got_s = fastml.ig_accumulate(grads, *backend_args, weights, multiply_by_inputs=mul, acc=acc,
                                            return_sums=True, backend="cpp")
        ref_a, ref_s = fastml.ig_accumulate(grads, *backend_args, weights, multiply_by_inputs=mul, acc=acc,
                                            return_sums=True, backend="reference")
        assert got_a.dtype == ref_a.dtype == ad
        assert_close(got_a, ref_a, dtype=dtype)
        assert_close(got_s, ref_s, dtype=dtype, rtol=1e-3 if dtype != torch.float64 else None)


def test_cpp_noncontiguous_inputs():
    _cpp_or_skip()
    x = torch.randn(6, 4).t()  # [4, 6], strided
    xb = torch.randn(4, 6)
    w = torch.rand(2)
    grads = torch.randn(6, 8).t()  # [S*B, 6] = [8, 6], strided
    assert_close(fastml.ig_scale_inputs(x, xb, w, backend="cpp"), fastml.ig_scale_inputs(x, xb, w, backend="reference"))
    assert_close(fastml.ig_accumulate(grads, x, xb, w, backend="cpp"),
                 fastml.ig_accumulate(grads, x, xb, w, backend="reference"))


def test_opcheck():
    _cpp_or_skip()
    x, xb, grads, alphas, weights = _data((3, 4), torch.float32, 2)
    torch.library.opcheck(torch.ops.fastml.ig_scale_inputs, (x, xb, alphas.float()))
    acc = torch.randn(3, 4)
    for mul, a in [(True, None), (False, acc)]:
        torch.library.opcheck(torch.ops.fastml.ig_accumulate, (grads, x, xb, weights.float(), mul, a))


def test_triton_reports_unavailable_without_its_op():
    reason = _backend.op_backends("ig_accumulate")["triton"].why_not(_backend.Call(torch.device("cpu"), torch.float32))
    if hasattr(torch.ops.fastml, "ig_accumulate_triton"):
        pytest.skip("the triton ops are registered here; kernels tests cover them")
    assert reason is not None


def test_path_errors_name_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="baselines"):
        fastml.ig_scale_inputs(x, torch.randn(4, 3), torch.rand(2))
    with pytest.raises(ValueError, match="alphas"):
        fastml.ig_scale_inputs(x, x, torch.rand(2, 1))
    with pytest.raises(ValueError, match="grads"):
        fastml.ig_accumulate(torch.randn(5, 3), x, x, torch.rand(2))
    with pytest.raises(TypeError, match="inputs"):
        fastml.ig_scale_inputs(x.long(), x.long(), torch.rand(2))


def test_path_kernels_compile_fullgraph():
    _cpp_or_skip()
    x, xb, grads, alphas, weights = _data((3, 5), torch.float32, 4)

    def f(x, xb, grads):
        scaled = fastml.ig_scale_inputs(x, xb[:1], alphas.float(), backend="cpp")
        attr, sums = fastml.ig_accumulate(grads + scaled, x, xb[:1], weights.float(), return_sums=True,
                                          backend="cpp")
        return attr, sums

    got = torch.compile(f, fullgraph=True)(x, xb, grads)
    for a, e in zip(got, f(x, xb, grads)):
        assert_close(a, e)


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


# The kernel backends that run on CPU tensors here (triton through its interpreter).
KERNELS = ["cpp"] + (["triton"] if triton_cpu_error() is None else [])


@pytest.mark.parametrize("case", _layouts(), ids=lambda c: c[0])
def test_layouts_match_reference(case):
    _, x, xb, grads = case
    alphas = torch.tensor([0.1, 0.5, 0.9])
    before = [t.clone() for t in (x, xb, grads)]
    for backend in KERNELS:
        assert_close(fastml.ig_scale_inputs(x, xb, alphas, backend=backend),
                     fastml.ig_scale_inputs(x, xb, alphas, backend="reference"), name=f"{backend} scaled")
        for mul in (True, False):
            got = fastml.ig_accumulate(grads, x, xb, alphas, multiply_by_inputs=mul, return_sums=True,
                                       backend=backend)
            want = fastml.ig_accumulate(grads, x, xb, alphas, multiply_by_inputs=mul, return_sums=True,
                                        backend="reference")
            assert_close(got[0], want[0], name=f"{backend} attributions")
            assert_close(got[1], want[1], rtol=1e-4, name=f"{backend} sums")
    for t, b in zip((x, xb, grads), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("backend", KERNELS)
def test_integrated_gradients_through_each_backend(backend):
    # Tuple inputs (one of them a transposed view), default, scalar and broadcast baselines, and the model's own
    # gradients, through the whole driver.
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
