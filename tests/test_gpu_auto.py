"""The paths `backend="auto"` takes on CUDA tensors, end to end against the reference on the CPU (run by
`make test-gpu`; skipped without a CUDA device)."""
import pytest
import torch

import fastml
from fastml import _backend
from fastml.testing import assert_close

pytestmark = pytest.mark.gpu


def _chosen(op, dtype, **options):
    return _backend.select(op, _backend.Call(torch.device("cuda"), dtype, options)).name


def test_auto_picks_triton_on_cuda():
    assert _chosen("causal_linear_attention", torch.float16, K=64, V=64) == "triton"
    assert _chosen("ig_accumulate", torch.float32) == "triton"
    assert _chosen("ig_scale_inputs", torch.float32) == "triton"


def _convnet():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 5)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_integrated_gradients_on_cuda_match_the_cpu_reference(dtype):
    model = _convnet().to(dtype)
    x = torch.randn(6, 3, 16, 16, dtype=dtype)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    want = fastml.integrated_gradients(model, x, target=target, n_steps=32, backend="reference")
    got = fastml.integrated_gradients(model.cuda(), x.cuda(), target=target.cuda(), n_steps=32)
    assert got.device.type == "cuda"
    # The model's own CUDA convolutions differ from the CPU ones by their rounding.
    tol = dict(rtol=1e-3, atol=1e-5) if dtype == torch.float32 else {}
    assert_close(got.cpu(), want, name="attributions", **tol)


def test_linear_attention_layer_on_cuda_trains_like_the_reference():
    torch.manual_seed(0)
    layer = fastml.nn.CausalLinearAttention(64, 4)
    x = torch.randn(2, 300, 64)
    y_ref = layer(x)
    y_ref.square().mean().backward()
    g_ref = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer = layer.cuda()
    y = layer(x.cuda())
    y.square().mean().backward()
    assert_close(y.cpu(), y_ref, rtol=1e-3, atol=1e-4, name="output")
    for (name, p), g in zip(layer.named_parameters(), g_ref):
        assert_close(p.grad.cpu(), g, rtol=1e-3, atol=1e-4, name=name)
