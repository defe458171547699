"""The Triton integrated-gradients path ops against the same formulas in plain torch (interpreter on CPU, or GPU)."""
import pytest
import torch

import fastml  # noqa: F401  (registers the ops)
from fastml._backend import triton_cpu_error
from fastml.testing import assert_close

pytestmark = pytest.mark.skipif(triton_cpu_error() is not None, reason=str(triton_cpu_error()))

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

