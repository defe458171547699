"""Tree decoders: eisner's cpp kernel against its batched PyTorch reference, and mart, in one table.

CPU (`make bench`): eisner on B=32 sentences of n = 50 and n = 100 (root included, every sentence full length),
float32 random scores, through the public function (validation included), on 1 thread and on all threads (torch's
default); "x ref" compares with the reference on the same threads. mart on one 50 x 50 matrix (no backend
choice). "sentences/s" is B over the median time. There is no CUDA measurement: eisner's
kernel is a CPU kernel (its reference runs on CUDA but is not the path worth timing there).
"""
import pytest
import torch

from fastml.ops.trees import eisner, mart

B = 32
EISNER_N = (50, 100)
MART_N = 50
_REFERENCE_MS = {}


def _cases():
    return ([("eisner", n, b, t) for t in (1, None) for n in EISNER_N for b in ("reference", "cpp")]
            + [("mart", MART_N, "torch", None)])


@pytest.mark.parametrize("case", _cases(), ids=[f"{c[0]}-n{c[1]}-{c[2]}-threads{c[3] or 'all'}" for c in _cases()])
def test_trees(benchmark, case, device, results):
    from runner import time_ms

    op, n, backend, threads = case
    if device != "cpu":
        pytest.skip("the tree decoders are measured on the CPU")
    g = torch.Generator().manual_seed(0)
    if op == "eisner":
        import fastml
        from fastml import _backend

        try:
            _backend.select("eisner", _backend.Call(torch.device("cpu"), torch.float32), backend)
        except fastml.BackendUnavailable as exc:
            pytest.skip(str(exc))
        scores = torch.randn(B, n, n, generator=g)

        def fn():
            return eisner(scores, backend=backend)

        batch = B
    else:
        scores = torch.randn(n, n, generator=g)

        def fn():
            return mart(scores)

        batch = 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        ms = time_ms(benchmark, fn, device, rounds=3 if backend == "reference" and n >= 100 else 7)
    finally:
        torch.set_num_threads(before)
    used = threads or before
    if backend == "reference":
        _REFERENCE_MS[(op, n, used)] = ms
    ref = _REFERENCE_MS.get((op, n, used))
    results.add("trees (cpu)", {"op": op, "shape": f"B{batch} n{n}", "dtype": "float32", "threads": used,
                                "backend": backend, "ms": ms,
                                "x ref": (ref / ms) if ref and backend != "reference" else "",
                                "sentences/s": batch / ms * 1e3})
