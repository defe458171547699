"""fastml.distributed.causal_linear_attention on real gloo process groups, against the single-process op.

One launch of three worker processes (this file run as a script with --worker) serves every test here: the workers
join a gloo group through a file:// rendezvous in a temporary directory (no port to pick), build a two-rank
subgroup of global ranks 1 and 2 besides the three-rank world, run each case below and write what they saw to a
JSON file per rank; the tests read those files. The launch is shared by the pytest-xdist workers (a file lock in
the common temporary directory). Every collective has a timeout and the launch a deadline, so a hang fails the
tests instead of stalling the suite. All numerics are float64, so outputs, final states and every gradient must
match the single-process op on the whole sequence to float64 rounding.
"""
import datetime
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORLD = 3
PAIR = (1, 2)  # global ranks of the two-rank subgroup (group ranks 0 and 1)
COLLECTIVE_TIMEOUT_S = 60
LAUNCH_DEADLINE_S = 420
ROOT = Path(__file__).resolve().parent.parent

# Numerical cases: the group, each rank's slice length (in group-rank order), the options, and the backend of each
# group rank ("auto" unless given). "grad" is which inputs require grad: "all", "q", "init" (the initial state
# only) or "none" (under no_grad).
CASES = {
    "elu_normalized": dict(group="world", lengths=[5, 9, 3], feature_map="elu+1"),
    # Slices longer than the chunk in which a rank computes its contribution and that contribution's gradient.
    "elu_chunked": dict(group="world", lengths=[17, 9, 23], feature_map="elu+1", initial_state=True,
                        output_final_state=True, chunk=4),
    "relu_chunked_unnormalized": dict(group="world", lengths=[12, 7, 11], feature_map="relu", normalize=False,
                                      output_final_state=True, chunk=5),
    "identity_chunked_float16": dict(group="world", lengths=[50, 70, 30], feature_map=None, normalize=False,
                                     output_final_state=True, chunk=16, dtype="float16"),
    "identity_unnormalized_state": dict(group="world", lengths=[4, 6, 7], feature_map=None, normalize=False,
                                        scale=0.5, initial_state=True, output_final_state=True),
    "relu_eps_scale_state": dict(group="world", lengths=[7, 2, 8], feature_map="relu", eps=1e-3, scale=2.0,
                                 initial_state=True, output_final_state=True),
    "callable_map_changes_dim": dict(group="world", lengths=[6, 5, 4], feature_map="callable",
                                     output_final_state=True),
    "reference_backend": dict(group="world", lengths=[3, 8, 6], feature_map="elu+1", initial_state=True,
                              output_final_state=True, backends=["reference"] * 3),
    "mixed_backends": dict(group="world", lengths=[6, 6, 5], feature_map="elu+1", output_final_state=True,
                           backends=["reference", "cpp", "auto"]),
    "empty_middle_slice": dict(group="world", lengths=[5, 0, 6], feature_map="elu+1", initial_state=True,
                               output_final_state=True),
    "only_q_requires_grad": dict(group="world", lengths=[4, 5, 6], feature_map="elu+1", grad="q"),
    "no_grad": dict(group="world", lengths=[4, 5, 6], feature_map="elu+1", output_final_state=True, grad="none"),
    # Only rank 0's initial state needs a gradient: the other ranks must still join the backward.
    "only_initial_state_requires_grad": dict(group="world", lengths=[4, 5, 6], feature_map="elu+1",
                                             initial_state=True, output_final_state=True, grad="init"),
    # Other dtypes, against the single-process op in the same dtype (norm-wise, as the kernels' own tests).
    "float32": dict(group="world", lengths=[40, 25, 50], feature_map="elu+1", output_final_state=True,
                    dtype="float32"),
    "float16_relu": dict(group="world", lengths=[30, 45, 20], feature_map="relu", eps=1e-2, initial_state=True,
                         output_final_state=True, dtype="float16"),
    "pair_elu_normalized": dict(group="pair", lengths=[9, 4], feature_map="elu+1"),
    "pair_every_option": dict(group="pair", lengths=[3, 10], feature_map="relu", eps=1e-2, scale=1.5,
                              initial_state=True, output_final_state=True),
    "pair_unnormalized_state": dict(group="pair", lengths=[6, 7], feature_map=None, normalize=False,
                                    initial_state=True, output_final_state=True),
}
LAYER_CASES = {"layer_world": "world", "layer_pair": "pair"}
# Bad calls on the three-rank world: (what each rank changes in a valid call, the error every rank must raise,
# a word its message must contain).
ERRORS = {
    "heads_mismatch": ({1: "heads"}, "ValueError", "heads"),
    "dtype_mismatch": ({2: "float32"}, "TypeError", "dtype"),
    "initial_state_on_rank_1": ({1: "initial_state"}, "ValueError", "initial_state"),
    "normalize_mismatch": ({2: "normalize"}, "ValueError", "normalize"),
    "eps_mismatch": ({1: "eps"}, "ValueError", "eps"),
    "feature_map_mismatch": ({0: "feature_map"}, "ValueError", "feature_map"),
    "local_bad_length": ({1: "short_v"}, "ValueError", "sequence length"),
    "local_not_a_tensor": ({2: "not_a_tensor"}, "TypeError", "torch.Tensor"),
    "cu_seqlens": ({0: "cu_seqlens"}, "TypeError", "cu_seqlens"),
    "grad_mode_mismatch": ({1: "no_grad"}, "ValueError", "grad mode"),
    "backend_unavailable": ({2: "triton"}, "BackendUnavailable", "triton"),
}


# ----------------------------------------------------------------------------------------------------------------
# Worker side (runs in the launched processes)
# ----------------------------------------------------------------------------------------------------------------

def _split_map(x):
    """A callable feature map that doubles the feature dim."""
    import torch

    return torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)


def _run_case(case, group, seed):
    import fastml.distributed.sequence_parallel as sp

    chunk, sp.CHUNK = sp.CHUNK, case.get("chunk", sp.CHUNK)
    try:
        return _compare(case, group, seed)
    finally:
        sp.CHUNK = chunk


def _compare(case, group, seed):
    import torch
    import torch.distributed as dist

    import fastml
    import fastml.distributed
    from fastml._numerics import acc_dtype
    from fastml.testing import assert_close, assert_close_norm

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    lengths = case["lengths"]
    start, T = sum(lengths[:rank]), sum(lengths)
    sl = slice(start, start + lengths[rank])
    B, H, K, V = 2, 2, 4, 3
    f64 = torch.float64
    dtype = getattr(torch, case.get("dtype", "float64"))
    sd = acc_dtype(dtype)
    g = torch.Generator().manual_seed(seed)  # the same draws on every rank
    q, k, v = (torch.randn(B, H, T, d, dtype=f64, generator=g).to(dtype) for d in (K, K, V))
    Km = 2 * K if case.get("feature_map") == "callable" else K
    init = (torch.randn(B, H, Km, V, dtype=f64, generator=g).to(sd),
            (torch.rand(B, H, Km, dtype=f64, generator=g) + 0.5).to(sd))
    do = torch.randn(B, H, T, V, dtype=f64, generator=g).to(dtype)
    d_final = [(torch.randn(B, H, Km, V, dtype=f64, generator=g).to(sd),
                torch.randn(B, H, Km, dtype=f64, generator=g).to(sd)) for _ in range(size)]
    fmap = _split_map if case.get("feature_map") == "callable" else case.get("feature_map")
    opts = dict(feature_map=fmap, normalize=case.get("normalize", True), eps=case.get("eps", 1e-6),
                scale=case.get("scale", 1.0), output_final_state=case.get("output_final_state", False))
    grad = case.get("grad", "all")
    use_init = case.get("initial_state", False)
    backend = case.get("backends", ["auto"] * size)[rank]

    def leaves(ts, sl=slice(None)):
        out = [t[:, :, sl].clone() for t in ts]
        if grad == "all":
            out = [t.requires_grad_() for t in out]
        elif grad == "q":
            out[0].requires_grad_()
        return out

    def loss_of(out, sl, final_grads):
        o, state = out if opts["output_final_state"] else (out, None)
        loss = (o.to(sd) * do[:, :, sl].to(sd)).sum()
        if state is not None:
            loss = loss + sum((s * d).sum() for s, d in zip(state, final_grads))
        return o, state, loss

    ctx = torch.no_grad() if grad == "none" else torch.enable_grad()
    # The single-process op on the whole sequence. The final state's gradient is the sum of every rank's.
    full = leaves((q, k, v))
    full_init = tuple(t.clone().requires_grad_(grad in ("all", "init")) for t in init) if use_init else None
    total_d = [sum(d[i] for d in d_final) for i in range(2)]
    with ctx:
        o_ref, s_ref, loss_ref = loss_of(fastml.causal_linear_attention(
            *full, initial_state=full_init, **opts, backend=backend), slice(None), total_d)
    # This rank's slice through the group.
    mine = leaves((q, k, v), sl)
    my_init = (tuple(t.clone().requires_grad_(grad in ("all", "init")) for t in init) if use_init and rank == 0
               else None)
    with ctx:
        o, s, loss = loss_of(fastml.distributed.causal_linear_attention(
            *mine, group=group, initial_state=my_init, **opts, backend=backend), sl, d_final[rank])
    checks = {"o": (o, o_ref[:, :, sl])}
    if s is not None:
        checks.update({"final kv": (s.kv, s_ref.kv), "final z": (s.z, s_ref.z)})
    if grad != "none":
        loss.backward()
        loss_ref.backward()
        names = {"all": ("dq", "dk", "dv"), "q": ("dq",), "init": ()}[grad]
        for name, a, e in zip(names, mine, full):
            checks[name] = (a.grad, e.grad[:, :, sl])
        if my_init is not None:
            checks.update({"d initial kv": (my_init[0].grad, full_init[0].grad),
                           "d initial z": (my_init[1].grad, full_init[1].grad)})
    result = {"checked": sorted(checks)}
    for name, (a, e) in checks.items():
        try:
            assert a.dtype == e.dtype, f"{name}: dtype {a.dtype}, expected {e.dtype}"
            (assert_close if dtype == f64 else assert_close_norm)(a, e, name=name)
        except AssertionError as exc:
            result.setdefault("failures", []).append(str(exc))
    # The check can fail: past the first rank, the slice alone (without the earlier ranks' state) is far off.
    if lengths[rank] and (rank > 0 or use_init):
        with torch.no_grad():
            alone = fastml.causal_linear_attention(*(t[:, :, sl] for t in (q, k, v)),
                                                   **{**opts, "output_final_state": False})
        result["slice_alone_error"] = float((alone - o_ref[:, :, sl]).abs().max())
    return result


def _run_layer(group, seed):
    """nn.CausalLinearAttention with sequence_parallel_group against the plain layer on the whole sequence; the
    parameters' gradients are summed over the group (each rank's loss is its share of the whole)."""
    import torch
    import torch.distributed as dist

    from fastml.nn import CausalLinearAttention
    from fastml.testing import assert_close

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    lengths = [3 + 2 * r for r in range(size)]
    start, T = sum(lengths[:rank]), sum(lengths)
    sl = slice(start, start + lengths[rank])
    f64 = torch.float64
    torch.manual_seed(seed)
    plain = CausalLinearAttention(8, 2, dtype=f64)
    split = CausalLinearAttention(8, 2, dtype=f64, sequence_parallel_group=group)
    split.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 8, dtype=f64, generator=g)
    dy = torch.randn(2, T, 8, dtype=f64, generator=g)
    state = plain.initial_state(2)
    state = type(state)(torch.randn_like(state.kv), torch.rand_like(state.z))
    dkv = torch.randn_like(state.kv)
    xf = x.clone().requires_grad_()
    y_ref, s_ref = plain(xf, state=state, return_state=True)
    ((y_ref * dy).sum() + (s_ref.kv * dkv).sum()).backward()
    xs = x[:, sl].clone().requires_grad_()
    y, s = split(xs, state=state if rank == 0 else None, return_state=True)
    # The final state's gradient enters on the last rank only.
    ((y * dy[:, sl]).sum() + (s.kv * dkv).sum() * (rank == size - 1)).backward()
    checks = {"y": (y, y_ref[:, sl]), "final kv": (s.kv, s_ref.kv), "dx": (xs.grad, xf.grad[:, sl])}
    for (name, p), (_, p_ref) in zip(split.named_parameters(), plain.named_parameters()):
        dist.all_reduce(p.grad, group=group)
        checks["d " + name] = (p.grad, p_ref.grad)
    result = {"checked": sorted(checks)}
    for name, (a, e) in checks.items():
        try:
            assert_close(a, e, name=name)
        except AssertionError as exc:
            result.setdefault("failures", []).append(str(exc))
    return result


def _run_error(changes, rank):
    """A valid three-rank call, with this rank's change applied; returns what the call raised."""
    import torch

    import fastml
    import fastml.distributed

    change = changes.get(rank)
    g = torch.Generator().manual_seed(rank)
    dtype = torch.float32 if change == "float32" else torch.float64
    H = 3 if change == "heads" else 2
    q, k, v = (torch.randn(1, H, 4, d, dtype=dtype, generator=g) for d in (4, 4, 3))
    q.requires_grad_()
    kwargs = dict(feature_map="relu" if change == "feature_map" else "elu+1")
    if change == "short_v":
        v = v[:, :, :3]
    if change == "not_a_tensor":
        q = q.tolist()
    if change == "initial_state":
        kwargs["initial_state"] = fastml.LinearAttentionState(torch.zeros(1, H, 4, 3, dtype=dtype),
                                                              torch.zeros(1, H, 4, dtype=dtype))
    if change == "normalize":
        kwargs["normalize"] = False
    if change == "eps":
        kwargs["eps"] = 1e-5
    if change == "cu_seqlens":
        kwargs["cu_seqlens"] = torch.tensor([0, 4])
    if change == "triton":
        kwargs["backend"] = "triton"
    try:
        with torch.set_grad_enabled(change != "no_grad"):
            fastml.distributed.causal_linear_attention(q, k, v, **kwargs)
    except Exception as exc:  # noqa: BLE001  (the test compares the kind)
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None}


def worker(rank, world, init_file, out_dir):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    pair = dist.new_group(list(PAIR))
    results = {}

    def attempt(name, fn):
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001  (reported to the test, which fails on it)
            results[name] = {"crashed": f"{type(exc).__name__}: {exc}"}
        results[name]["seconds"] = time.perf_counter() - t0

    for i, (name, case) in enumerate(CASES.items()):
        group = None if case["group"] == "world" else pair
        if case["group"] == "pair" and rank not in PAIR:
            continue
        attempt(name, lambda: _run_case(case, group, seed=100 + i))
    for name, which in LAYER_CASES.items():
        if which == "pair" and rank not in PAIR:
            continue
        attempt(name, lambda: _run_layer(dist.group.WORLD if which == "world" else pair, seed=7))
    for name, (changes, _, _) in ERRORS.items():
        attempt(name, lambda: _run_error(changes, rank))
    # After every error above, the group still works: nothing was left half-sent.
    attempt("after_errors", lambda: _run_case(CASES["elu_normalized"], None, seed=999))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Test side
# ----------------------------------------------------------------------------------------------------------------

def _launch(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    init_file = workdir / "rendezvous"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(WORLD), str(init_file),
                               str(workdir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    deadline = time.monotonic() + LAUNCH_DEADLINE_S
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            return {"launch_error": f"the workers did not finish within {LAUNCH_DEADLINE_S} s"}
        outputs.append(out)
    bad = [(r, p.returncode, out) for r, (p, out) in enumerate(zip(procs, outputs)) if p.returncode]
    if bad:
        return {"launch_error": "\n".join(f"rank {r} exited with {rc}:\n{out[-3000:]}" for r, rc, out in bad)}
    return {str(r): json.loads((workdir / f"rank{r}.json").read_text()) for r in range(WORLD)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every rank's results, from the one launch that all pytest-xdist workers share."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    result_file = shared / "fastml_distributed_results.json"
    with open(shared / "fastml_distributed.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result_file.exists():
            result_file.write_text(json.dumps(_launch(shared / "fastml_distributed_run")))
        data = json.loads(result_file.read_text())
    if "launch_error" in data:
        pytest.fail(data["launch_error"])
    return data


def _ranks_of(group):
    return list(range(WORLD)) if group == "world" else list(PAIR)


def _check(runs, name, ranks):
    for r in ranks:
        res = runs[str(r)].get(name)
        assert res is not None, f"rank {r} has no result for {name}"
        assert "crashed" not in res, f"rank {r}: {res['crashed']}"
        assert not res.get("failures"), f"rank {r}: " + "\n".join(res["failures"])
    return [runs[str(r)][name] for r in ranks]


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process(runs, name):
    case = CASES[name]
    results = _check(runs, name, _ranks_of(case["group"]))
    expected = {"o"}
    if case.get("output_final_state"):
        expected |= {"final kv", "final z"}
    grad = case.get("grad", "all")
    expected |= {"all": {"dq", "dk", "dv"}, "q": {"dq"}}.get(grad, set())
    for group_rank, res in enumerate(results):
        want = expected | ({"d initial kv", "d initial z"} if group_rank == 0 and case.get("initial_state")
                           and grad in ("all", "init") else set())
        assert set(res["checked"]) == want, (group_rank, res["checked"])
        # The comparison is sensitive: the slice without the earlier ranks' state is far from the truth.
        if "slice_alone_error" in res:
            assert res["slice_alone_error"] > 1e-3, res


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_with_sequence_parallel_group(runs, name):
    for res in _check(runs, name, _ranks_of(LAYER_CASES[name])):
        assert {"y", "dx", "final kv", "d qkv_proj.weight", "d out_proj.bias"} <= set(res["checked"]), res


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_call_raises_on_every_rank(runs, name):
    changes, kind, word = ERRORS[name]
    for r in range(WORLD):
        res = runs[str(r)][name]
        assert "crashed" not in res, f"rank {r}: {res['crashed']}"
        assert res["type"] == kind, f"rank {r} raised {res['type']}: {res.get('message')}"
        culprit = next(iter(changes))
        if r == culprit:
            assert word in res["message"], f"rank {r}: {res['message']}"
        else:
            # The other ranks say which rank was at fault (or see the mismatch themselves).
            assert word in res["message"] or f"rank {culprit}" in res["message"], f"rank {r}: {res['message']}"
        # An error is quick: no rank waited for a collective timeout.
        assert res["seconds"] < COLLECTIVE_TIMEOUT_S / 2, res


def test_group_still_works_after_errors(runs):
    _check(runs, "after_errors", list(range(WORLD)))


def test_example_trains_like_one_process(tmp_path):
    """examples/sequence_parallel.py under torchrun (2 ranks, a free port of its own): the loss falls, and the split
    run's losses and parameters match one process training the same model on the whole sequences (float64)."""
    import re

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "examples" / "sequence_parallel.py"), "--quick", "--check"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    first, last = (float(x) for x in re.search(r"first step (\S+), last step (\S+)", out).groups())
    assert last < first - 0.5, out
    loss_gap, param_gap = (float(x) for x in re.search(
        r"max \|loss difference\| = (\S+), max \|parameter difference\| = (\S+)", out).groups())
    assert loss_gap < 1e-10 and param_gap < 1e-10, out


def test_layer_rejects_a_bad_group():
    from fastml.nn import CausalLinearAttention

    with pytest.raises(TypeError, match="sequence_parallel_group"):
        CausalLinearAttention(8, 2, sequence_parallel_group="world")


def test_needs_an_initialized_process_group():
    import torch
    import torch.distributed as dist

    import fastml.distributed

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    q = torch.randn(1, 1, 2, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastml.distributed.causal_linear_attention(q, q, q)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
