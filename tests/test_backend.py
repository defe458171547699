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


def test_select_returns_the_implementation_that_runs(monkeypatch):
    """The op runs the `impl` of whatever select() returns: swapping a backend's impl changes what runs."""
    from fastml import _backend

    calls = []
    ref = _backend.op_backends("ig_scale_inputs")["reference"]

    def spy(inputs, baselines, alphas):
        calls.append(alphas.shape[0])
        return ref.impl(inputs, baselines, alphas)

    monkeypatch.setitem(_backend._REGISTRY["ig_scale_inputs"], "reference", _backend.Backend("reference", spy))
    x = torch.randn(2, 3)
    out = fastml.ig_scale_inputs(x, torch.zeros_like(x), torch.tensor([0.0, 0.5, 1.0]), backend="reference")
    assert calls == [3]
    torch.testing.assert_close(out[4:], x)


def test_backends_per_op_lists_only_what_is_registered():
    assert set(fastml.backends(op="linear_attention")) == {"reference"}
    assert set(fastml.backends(op="causal_linear_attention")) == {"reference", "cpp", "triton", "cuda"}
    assert fastml.backends(op="causal_linear_attention")["cpp"] == (True, None)
    with pytest.raises(ValueError, match="op must be one of"):
        fastml.backends(op="no_such_op")
    q, k, v = qkv()
    with pytest.raises(fastml.BackendUnavailable, match="linear_attention has no cpp implementation"):
        fastml.linear_attention(q, k, v, backend="cpp")


def test_kind_rules_are_declared_once():
    from fastml import _backend

    assert _backend.KINDS["triton"].why_not("cpu") == _backend.triton_cpu_error()
    assert "runs on cpu tensors" in _backend.KINDS["cpp"].why_not("cuda")
    with pytest.raises(ValueError, match="unknown backend kind"):
        _backend.Backend("opencl", impl=None)
    with pytest.raises(ValueError, match="unknown backend kinds"):
        _backend.set_priority("causal_linear_attention", "cuda", ("opencl", "reference"))


def test_backend_name_is_validated():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        fastml.causal_linear_attention(q, k, v, backend="CPP")


def test_every_registered_kernel_op_has_one_schema_for_cpp_and_triton():
    """The C++ op and its Triton twin are declared from one schema (fastml/ops/<op>/schema.py)."""
    for name in ("linear_attention_fwd", "linear_attention_bwd", "linear_attention_step", "ig_scale_inputs",
                 "ig_accumulate"):
        cpp = str(getattr(torch.ops.fastml, name).default._schema)
        twin = str(getattr(torch.ops.fastml, name + "_triton").default._schema)
        assert cpp.startswith(f"fastml::{name}(") and twin.startswith(f"fastml::{name}_triton(")
        assert cpp.split("(", 1)[1] == twin.split("(", 1)[1]


def test_source_tree_mounts_the_kernels_folder(tmp_path):
    """Without an install, `import fastml` from a copy of the source tree finds fastml.kernels in kernels/."""
    import os
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("fastml", "kernels"):
        shutil.copytree(os.path.join(root, name), tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "_C*.so"))
    code = ("import fastml, fastml.kernels, os; "
            "print(os.path.dirname(fastml.kernels.__file__)); print(fastml.backends()['cpp'][0])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -S keeps site-packages (and the editable install of the real tree) out; torch comes in by PYTHONPATH.
    torch_dir = os.path.dirname(os.path.dirname(torch.__file__))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), torch_dir])
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    kernels_dir, cpp_ok = out.stdout.split()
    assert os.path.samefile(kernels_dir, tmp_path / "kernels")
    assert cpp_ok == "False"  # no extension was copied: the cpp backend says so instead of failing the import


def test_interpreter_refuses_bfloat16_for_every_op():
    """A rule of the triton kind, declared once: under the interpreter (numpy, no bfloat16) no op takes bfloat16."""
    from fastml import _backend

    if _backend.triton_cpu_error() is not None:
        pytest.skip(_backend.triton_cpu_error())
    call = _backend.Call(torch.device("cpu"), torch.bfloat16, {"K": 4, "V": 3})
    for op in _backend.ops():
        triton = _backend.op_backends(op).get("triton")
        if triton is not None:
            assert "bfloat16" in triton.why_not(call), op
