"""The CUDA integrated-gradients path kernels (fastml::ig_scale_inputs, fastml::ig_accumulate) against the plain
torch formulas, on a GPU: dtypes, shapes whose size is and is not a multiple of the vector width, broadcast
baselines, a running sum, and opcheck."""
import pytest
import torch

from fastml.testing import assert_close

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (1, 300000): more elements than the accumulate's 256 tiles of 1024 cover at once; (66000, 3) and (66000, 4): many
# examples, on the one-wide and the four-wide path.
SHAPES = [(4, 3, 32, 32), (5, 7), (3,), (2, 1000, 13), (1, 4096), (1, 300000), (66000, 3), (66000, 4)]


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _data(shape, dtype, S, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to("cuda", dtype)
    xb = (torch.randn(shape, generator=g) * 0.1).to("cuda", dtype)
    alphas = torch.rand(S, generator=g).to("cuda", acc_dtype(dtype))
    return x, xb, alphas


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_scale_inputs(dtype, shape):
    S = 7
    x, xb, alphas = _data(shape, dtype, S, seed=len(shape))
    out = torch.ops.fastml.ig_scale_inputs(x, xb, alphas)
    ad = acc_dtype(dtype)
    a = alphas.view(S, *([1] * len(shape)))
    want = (xb.to(ad) + a * (x.to(ad) - xb.to(ad))).reshape(S * shape[0], *shape[1:])
    assert out.dtype == dtype and out.shape == want.shape
    assert_close(out, want, dtype=dtype, name="scaled inputs")


def test_scale_inputs_broadcast_baseline_and_offset_view():
    x, _, alphas = _data((6, 33), torch.float32, 4, seed=1)
    xb = torch.full((33,), 0.5, device="cuda").expand(6, 33)
    xv = torch.randn(6, 34, device="cuda")[:, 1:]  # non-contiguous and not 16-byte aligned
    for inp in (x, xv):
        out = torch.ops.fastml.ig_scale_inputs(inp, xb, alphas)
        want = (xb + alphas.view(4, 1, 1) * (inp - xb)).reshape(24, 33)
        assert_close(out, want, name="scaled inputs")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("multiply_by_inputs", [True, False])
@pytest.mark.parametrize("with_acc", [False, True])
def test_accumulate(dtype, shape, multiply_by_inputs, with_acc):
    S = 9
    B = shape[0]
    x, xb, weights = _data(shape, dtype, S, seed=2 + len(shape))
    g = torch.Generator().manual_seed(5)
    grads = torch.randn((S * B, *shape[1:]), generator=g).to("cuda", dtype)
    ad = acc_dtype(dtype)
    acc = torch.randn(shape, generator=g).to("cuda", ad) if with_acc else None
    attr, sums = torch.ops.fastml.ig_accumulate(grads, x, xb, weights, multiply_by_inputs, acc)
    total = (weights.view(S, *([1] * len(shape))) * grads.to(ad).view(S, *shape)).sum(0)
    if acc is not None:
        total = total + acc
    want = total * (x.to(ad) - xb.to(ad)) if multiply_by_inputs else total
    assert attr.dtype == ad and sums.dtype == ad and sums.shape == (B,)
    tol = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # exact inputs, fp32 sums
    assert_close(attr, want, dtype=tol, name="attributions")
    assert_close(sums, want.reshape(B, -1).sum(1), dtype=tol, name="sums")


def test_accumulate_broadcast_baseline_does_not_modify_inputs():
    S, B = 3, 4
    x = torch.randn(B, 10, device="cuda")
    xb = torch.tensor(0.25, device="cuda")
    grads = torch.randn(S * B, 10, device="cuda")
    weights = torch.tensor([0.2, 0.3, 0.5], device="cuda")
    acc = torch.ones(B, 10, device="cuda")
    copies = [t.clone() for t in (grads, x, acc)]
    attr, _ = torch.ops.fastml.ig_accumulate(grads, x, xb, weights, True, acc)
    want = (acc + (weights.view(S, 1, 1) * grads.view(S, B, 10)).sum(0)) * (x - xb)
    assert_close(attr, want, name="attributions")
    for before, after in zip(copies, (grads, x, acc)):
        assert torch.equal(before, after)


def test_accumulate_offset_views():
    # Views that start one element into their storage: the kernel falls back to one-wide loads.
    S, B, D = 3, 5, 64
    g_all = torch.randn(S * B * D + 1, device="cuda")
    x_all = torch.randn(B * D + 1, device="cuda")
    grads, x = g_all[1:].view(S * B, D), x_all[1:].view(B, D)
    xb = torch.zeros((), device="cuda")
    w = torch.tensor([0.2, 0.3, 0.5], device="cuda")
    attr, sums = torch.ops.fastml.ig_accumulate(grads, x, xb, w, True, None)
    want = (w.view(S, 1, 1) * grads.view(S, B, D)).sum(0) * x
    assert_close(attr, want, name="attributions")
    assert_close(sums, want.sum(1), name="sums")


def test_opcheck_ig_ops():
    x, xb, alphas = _data((3, 8), torch.float32, 5, seed=9)
    torch.library.opcheck(torch.ops.fastml.ig_scale_inputs, (x, xb, alphas))
    grads = torch.randn(15, 8, device="cuda")
    acc = torch.randn(3, 8, device="cuda")
    torch.library.opcheck(torch.ops.fastml.ig_accumulate, (grads, x, xb, alphas, True, acc))
    torch.library.opcheck(torch.ops.fastml.ig_accumulate, (grads, x, xb, alphas, False, None))
