"""Sequence-parallel causal linear attention: one process against a sequence split over 2 processes (CPU).

Forward + backward at B=1, H=8, K=V=64, float32, feature map elu+1, normalized. Two fresh processes with one thread
each (OMP_NUM_THREADS=1, torch.set_num_threads(1)) run, in every round and each after a barrier:
- "1 process": fastml.causal_linear_attention on the whole sequence, on the first process (the other waits);
- "2 ranks": fastml.distributed.causal_linear_attention over a gloo group of the 2 processes, T/2 tokens each (or
  the first rank's share given by --first-share); it lasts until the slower rank is done;
- "2 independent": the single-process op on T/2 tokens in each process at the same time, with no communication:
  the most two processes can get out of this machine at that moment (shared cores, caches, memory bandwidth and
  other users), a ceiling for any split.
The three alternate within every round, so that a machine whose speed drifts (shared with other jobs) gives all
three the same conditions. Medians over the rounds. Parallel efficiency = t(1 process) / (2 * t(2 ranks)); the ceiling is the same with the
independent pair. Bytes are what each rank handed to the collectives per forward + backward (the state exchange
both ways, and the argument check); they do not depend on T. CPU ms is process time per round (for the 2 ranks,
the busier one's): "CPU-time efficiency" = CPU(1 process) / (2 * CPU(busier rank)) leaves out the time a process
waits for a core that other jobs hold, so it shows what the algorithm costs when the machine is shared; on a machine
with two free cores the two efficiencies agree (up to the forward's wait for the first rank's state).

`make bench` runs T = 8192 and 65536. By hand, with a table printed:
    python benchmarks/bench_distributed.py [--T 8192 65536] [--rounds 5] [--first-share 0.5]
Nothing here asserts a speed.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

B, H, K, V = 1, 8, 64, 64
BENCH_T = (8192, 65536)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAT_KEYS = ("state_bytes_sent", "check_bytes_sent")


def worker(rank, T, first, rounds, init_file, out_file):
    """One of the two processes. Every round runs, each after a barrier: "one", the single-process op on all of T
    on rank 0 (rank 1 waits at the next barrier); "two", the sequence-parallel op on this rank's slice; "pair",
    the single-process op on an independent half on each rank at once. Interleaving the three in every round
    puts them under the same conditions of a shared machine."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import fastml
    import fastml.distributed
    from fastml.distributed.sequence_parallel import STATS

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))
    g = torch.Generator().manual_seed(rank)

    def inputs(n):
        q, k, v = (torch.randn(B, H, n, d, generator=g).mul_(0.3).requires_grad_() for d in (K, K, V))
        return q, k, v, torch.randn(B, H, n, V, generator=g)

    data = {"one": inputs(T) if rank == 0 else None, "two": inputs([first, T - first][rank]),
            "pair": inputs([T - T // 2, T // 2][rank])}

    def step(kind):
        q, k, v, do = data[kind]
        if kind == "two":
            o = fastml.distributed.causal_linear_attention(q, k, v, feature_map="elu+1")
        else:
            o = fastml.causal_linear_attention(q, k, v, feature_map="elu+1")
        o.backward(do)
        for t in (q, k, v):
            t.grad = None

    times = {kind: [] for kind in data}
    cpu = {kind: [] for kind in data}
    sent = {}
    for i in range(rounds + 1):  # the first round warms up
        for kind in data:
            dist.barrier()
            if data[kind] is None:
                continue
            before = dict(STATS)
            t0, c0 = time.perf_counter(), time.process_time()
            step(kind)
            seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            if i:
                times[kind].append(1e3 * seconds)
                cpu[kind].append(1e3 * cpu_s)
            if kind == "two":
                sent = {key: STATS[key] - before[key] for key in STAT_KEYS}
    every = [None] * 2
    dist.all_gather_object(every, (times, cpu))
    dist.destroy_process_group()
    if rank == 0:
        # A round of "two" or "pair" lasts until its slower rank is done and costs the busier rank this much CPU.
        report = {"sent": sent}
        for kind in data:
            if kind == "one":
                report[kind] = {"ms": times[kind], "cpu_ms": cpu[kind]}
            else:
                report[kind] = {"ms": [max(c) for c in zip(*(t[kind] for t, _ in every))],
                                "cpu_ms": [max(c) for c in zip(*(c[kind] for _, c in every))]}
        with open(out_file, "w") as f:
            json.dump(report, f)


def launch(T, first, rounds, timeout=900):
    """The two processes of one measurement; returns rank 0's report."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "rendezvous"), os.path.join(tmp, "out.json")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(rank), str(T),
                                   str(first), str(rounds), init_file, out_file], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for rank in range(2)]
        deadline = time.monotonic() + timeout
        for r, p in enumerate(procs):
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                raise RuntimeError(f"the measurement at T={T} did not finish in {timeout} s") from None
            if p.returncode:
                for other in procs:
                    other.kill()
                raise RuntimeError(f"process {r} at T={T} exited with {p.returncode}:\n{out[-3000:]}")
        with open(out_file) as f:
            return json.load(f)


def measure(T, rounds, first_share=0.5):
    first = round(T * first_share)
    rep = launch(T, first, rounds)
    med = {kind: (statistics.median(rep[kind]["ms"]), statistics.median(rep[kind]["cpu_ms"]))
           for kind in ("one", "two", "pair")}
    (t1, c1), (t2, c2), (t_ind, _) = med["one"], med["two"], med["pair"]
    return {"shape": f"B{B} H{H} T{T} K{K} V{V}", "slices": f"{first}+{T - first}",
            "1 process ms": t1, "2 ranks ms": t2, "2 independent ms": t_ind,
            "parallel efficiency %": 100 * t1 / (2 * t2), "ceiling %": 100 * t1 / (2 * t_ind),
            "1 process CPU ms": c1, "busier rank CPU ms": c2, "CPU-time efficiency %": 100 * c1 / (2 * c2),
            "state bytes / rank": rep["sent"]["state_bytes_sent"],
            "check bytes / rank": rep["sent"]["check_bytes_sent"],
            "load avg": os.getloadavg()[0]}


def test_sequence_parallel(benchmark, device, results):
    import pytest

    if device != "cpu":
        pytest.skip("the sequence-parallel benchmark splits a sequence over CPU processes")
    benchmark.pedantic(lambda: None, rounds=1)
    for T in BENCH_T:
        results.add("sequence-parallel causal_linear_attention (cpu, fwd+bwd, 1 thread per process)",
                    measure(T, rounds=7))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=list(BENCH_T))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--first-share", type=float, default=0.5, help="fraction of the tokens on rank 0")
    args = parser.parse_args()
    rows = [measure(T, args.rounds, args.first_share) for T in args.T]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        a = sys.argv[2:]
        worker(int(a[0]), int(a[1]), int(a[2]), int(a[3]), a[4], a[5])
    else:
        main()
