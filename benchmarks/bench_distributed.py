"""Sequence-parallel causal linear attention: one process against a sequence split over 2 processes (CPU).

Forward + backward at B=1, H=8, K=V=64, float32, feature map elu+1, normalized. Every run uses fresh processes
with one thread each (OMP_NUM_THREADS=1, torch.set_num_threads(1)):
- "1 process": fastml.causal_linear_attention on the whole sequence;
- "2 ranks": fastml.distributed.causal_linear_attention over a gloo group of 2 processes, T/2 tokens each (or the
  first rank's share given by --first-share); a round starts after a barrier and lasts until the slower rank is
  done;
- "2 independent": two unrelated single processes, T/2 tokens each, at the same time and with no communication:
  the most two processes can get out of this machine at that moment (shared cores, caches, memory bandwidth and
  other users), a ceiling for any split.
Medians over the rounds. Parallel efficiency = t(1 process) / (2 * t(2 ranks)); the ceiling is the same with the
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


def worker(rank, lengths, rounds, init_file, out_file):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import fastml
    import fastml.distributed
    from fastml.distributed.sequence_parallel import STATS

    world = len(lengths)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(B, H, lengths[rank], d, generator=g).mul_(0.3).requires_grad_() for d in (K, K, V))
    do = torch.randn(B, H, lengths[rank], V, generator=g)

    def step():
        if world > 1:
            o = fastml.distributed.causal_linear_attention(q, k, v, feature_map="elu+1")
        else:
            o = fastml.causal_linear_attention(q, k, v, feature_map="elu+1")
        o.backward(do)
        for t in (q, k, v):
            t.grad = None

    times, cpu, sent = [], [], {}
    for i in range(rounds + 1):  # the first round warms up
        if world > 1:
            dist.barrier()
        before = dict(STATS)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        if i:
            times.append(seconds)
            cpu.append(cpu_s)
            sent = {key: STATS[key] - before[key] for key in STAT_KEYS}
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, (times, cpu))
        times = [max(col) for col in zip(*(t for t, _ in every))]  # a round lasts until its slowest rank is done
        cpu = [max(col) for col in zip(*(c for _, c in every))]    # and costs the busier rank this much CPU
        dist.destroy_process_group()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"ms": [1e3 * s for s in times], "cpu_ms": [1e3 * s for s in cpu], "sent": sent}, f)


def _start(rank, lengths, rounds, init_file, out_file):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(rank),
                             ",".join(map(str, lengths)), str(rounds), init_file, out_file], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, what, timeout):
    deadline = time.monotonic() + timeout
    for r, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise RuntimeError(f"{what} did not finish in {timeout} s") from None
        if p.returncode:
            for other in procs:
                other.kill()
            raise RuntimeError(f"process {r} of {what} exited with {p.returncode}:\n{out[-3000:]}")


def launch(lengths, rounds, timeout=900):
    """One group of len(lengths) processes (one process: the single-process op); returns rank 0's report."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "rendezvous"), os.path.join(tmp, "out.json")
        procs = [_start(r, lengths, rounds, init_file, out_file) for r in range(len(lengths))]
        _wait(procs, f"the run with slices {lengths}", timeout)
        with open(out_file) as f:
            return json.load(f)


def launch_independent(lengths, rounds, timeout=900):
    """Single processes, one per length, running at the same time; returns their reports."""
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"out{i}.json") for i in range(len(lengths))]
        procs = [_start(0, [n], rounds, os.path.join(tmp, f"unused{i}"), out) for i, (n, out) in
                 enumerate(zip(lengths, outs))]
        _wait(procs, "the independent processes", timeout)
        reports = []
        for out in outs:
            with open(out) as f:
                reports.append(json.load(f))
        return reports


def measure(T, rounds, first_share=0.5):
    first = round(T * first_share)
    one = launch([T], rounds)
    pair = launch_independent([T - T // 2, T // 2], rounds)
    two = launch([first, T - first], rounds)
    t1, t2 = statistics.median(one["ms"]), statistics.median(two["ms"])
    t_ind = max(statistics.median(r["ms"]) for r in pair)
    c1, c2 = statistics.median(one["cpu_ms"]), statistics.median(two["cpu_ms"])
    return {"shape": f"B{B} H{H} T{T} K{K} V{V}", "slices": f"{first}+{T - first}",
            "1 process ms": t1, "2 ranks ms": t2, "2 independent ms": t_ind,
            "parallel efficiency %": 100 * t1 / (2 * t2), "ceiling %": 100 * t1 / (2 * t_ind),
            "1 process CPU ms": c1, "busier rank CPU ms": c2, "CPU-time efficiency %": 100 * c1 / (2 * c2),
            "state bytes / rank": two["sent"]["state_bytes_sent"],
            "check bytes / rank": two["sent"]["check_bytes_sent"],
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
        worker(int(a[0]), [int(n) for n in a[1].split(",")], int(a[2]), a[3], a[4])
    else:
        main()
