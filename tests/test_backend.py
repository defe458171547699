"""Backend registry and selection: backend=, FASTML_BACKEND, BackendUnavailable, fastml.backends()."""
import pytest
import torch

import fastml


def qkv():
    return torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 3)


def test_backends_report():
    info = fastml.backends()
    assert set(info) == {"reference", "cpp", "triton", "cuda"}
    assert info["reference"] == (True, None)
    assert info["cpp"] == (True, None)  # the extension is built by `make test`
    for name, (ok, reason) in info.items():
        assert ok == (reason is None), name
    if not torch.cuda.is_available():
        assert info["cuda"][0] is False and info["cuda"][1]


def test_named_backend_that_cannot_serve_raises():
    q, k, v = qkv()
    with pytest.raises(fastml.BackendUnavailable, match="cuda") as info:
        fastml.causal_linear_attention(q, k, v, backend="cuda")
    assert isinstance(info.value, RuntimeError)


def test_env_var_replaces_auto(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("FASTML_BACKEND", "cuda")
    with pytest.raises(fastml.BackendUnavailable):
        fastml.causal_linear_attention(q, k, v)
    monkeypatch.setenv("FASTML_BACKEND", "reference")
    want = fastml.causal_linear_attention(q, k, v, backend="reference")
    torch.testing.assert_close(fastml.causal_linear_attention(q, k, v), want)
    monkeypatch.setenv("FASTML_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTML_BACKEND"):
        fastml.causal_linear_attention(q, k, v)


def test_auto_prefers_cpp_on_cpu(monkeypatch):
    from fastml import _backend

    chosen = _backend.select("causal_linear_attention", _backend.Call(torch.device("cpu"), torch.float32, {}))
    assert chosen.name == "cpp"


def test_triton_serves_cpu_only_when_named_and_interpreting(monkeypatch):
    from fastml import _backend

    call = _backend.Call(torch.device("cpu"), torch.float32, {"K": 4, "V": 3})
    assert _backend.select("causal_linear_attention", call).name != "triton"
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", False)
    with pytest.raises(fastml.BackendUnavailable, match="TRITON_INTERPRET"):
        _backend.select("causal_linear_attention", call, "triton")


def test_priority_list_must_end_with_reference():
    from fastml import _backend

    with pytest.raises(ValueError):
        _backend.set_priority("causal_linear_attention", "cuda", ("triton", "cuda"))
