"""Shared benchmark machinery: timing, the machine's measured peaks, peak memory of one call, and the tables.

Timings are medians; each table compares backends measured in the same run. Nothing here asserts a speed.
"""
import datetime
import json
import os
import socket
import subprocess
import sys
import textwrap

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(benchmark, fn, device, *, rounds=5, seconds=None):
    """Median milliseconds of fn(). CPU: pytest-benchmark rounds, or with seconds as many rounds as fill that long
    (at least `rounds`, at most 500: a shared machine's speed changes from second to second, and a few rounds of a
    short call would all fall in one fast or slow spell); CUDA: triton.testing.do_bench (the benchmark fixture
    still runs fn once so pytest-benchmark records the test)."""
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        benchmark.pedantic(fn, rounds=1, iterations=1)
        return ms
    if seconds is not None:
        import math
        import time

        fn()
        t0 = time.perf_counter()
        fn()
        rounds = min(500, max(rounds, math.ceil(seconds / (time.perf_counter() - t0))))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    return benchmark.stats.stats.median * 1e3


def interleaved_ms(calls, *, rounds, seconds=0.0, prepare=None):
    """Median milliseconds of each call in calls (a dict of functions), called in turn round by round so that all
    see the same conditions of a shared machine: a warm-up round, then `rounds` rounds, more until `seconds` have
    passed. prepare(key), if given, runs before each call, untimed."""
    import statistics
    import time

    ms = {key: [] for key in calls}
    i, start = 0, time.perf_counter()
    while i <= rounds or time.perf_counter() - start < seconds:
        for key, fn in calls.items():
            if prepare is not None:
                prepare(key)
            t0 = time.perf_counter()
            fn()
            if i:
                ms[key].append(1e3 * (time.perf_counter() - t0))
        i += 1
    return {key: statistics.median(v) for key, v in ms.items()}


def cpu_sgemm_peak_gflops():
    """Best of 10 float32 1024 x 1024 matmuls on all threads: the peak every CPU GFLOP/s figure is a fraction of."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        torch.matmul(a, b)
    best = float("inf")
    import time

    for _ in range(10):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best / 1e9


def cuda_peaks():
    """(bf16 matmul TFLOP/s, device-to-device copy GB/s counting bytes read and written), measured now."""
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: torch.matmul(a, b), return_mode="median")
    tflops = 2 * n**3 / ms / 1e9
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    gbps = 2 * x.numel() / ms / 1e6
    return tflops, gbps


HWM_SNIPPET = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""


def peak_memory_mb(setup, call, env=None):
    """How much one call raises the peak resident memory (VmHWM) of a fresh Python process, in MB.

    `setup` (statements) builds the inputs; `call` (statements) is what is measured. ru_maxrss is inherited
    across fork/exec, so the child reads its own /proc/self/status before and after."""
    script = "\n".join(["import torch", "import fastml", HWM_SNIPPET, textwrap.dedent(setup), "before = hwm()",
                        textwrap.dedent(call), "print(hwm() - before)"])
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


class Results:
    """Rows collected over a run, printed as one markdown table per op and saved as JSON and markdown."""

    # Columns derived when the tables are written: percent of a machine peak, from a throughput column. The peak is
    # the best seen in the run (measured at its start and again at its end), so one reading taken while something
    # else loaded the machine cannot inflate every fraction.
    FRACTIONS = {"% sgemm peak": ("GFLOP/s", "sgemm peak GFLOP/s"), "% copy BW": ("GB/s", "copy GB/s")}

    def __init__(self):
        self.rows = {}
        self.machine = {}
        self.device = "cpu"
        self._kept = None  # tables of an earlier run of the same day that this run does not measure

    def _path(self):
        stem = f"{datetime.date.today().isoformat()}-{socket.gethostname()}-{self.device}"
        return os.path.join(RESULTS_DIR, stem)

    def _load_kept(self):
        """The day's earlier results, read once before this run first writes: running one benchmark file keeps the
        other ops' tables of the day (each with the machine peaks of its own run)."""
        if self._kept is not None:
            return
        self._kept = {}
        try:
            with open(self._path() + ".json") as f:
                old = json.load(f)
        except (OSError, ValueError):
            return
        for op, rows in old.get("tables", {}).items():
            self._kept[op] = {"rows": rows, "machine": old.get("kept machine", {}).get(op, old.get("machine", {}))}

    def add(self, op, row):
        self.rows.setdefault(op, []).append(row)
        self.save()  # after every row, so a run cut short keeps what it measured

    def record_peak(self, key, value):
        """A reading of a machine peak: the table uses the best one."""
        self.machine[key] = round(max(value, self.machine.get(key, 0.0)), 1)

    def _tables(self):
        out = {}
        for op, rows in self.rows.items():
            out[op] = []
            for r in rows:
                full = {}
                for c, value in r.items():
                    full[c] = value
                    for col, (src, key) in self.FRACTIONS.items():
                        if c == src and self.machine.get(key):
                            full[col] = 100 * value / self.machine[key]
                out[op].append(full)
        return out

    def _kept_tables(self):
        return {op: k for op, k in (self._kept or {}).items() if op not in self.rows}

    def markdown(self):
        lines = []
        if self.machine:
            lines.append("Machine: " + ", ".join(f"{k} {v}" for k, v in self.machine.items()))
            lines.append("")
        kept = self._kept_tables()
        tables = {**{op: k["rows"] for op, k in kept.items()}, **self._tables()}
        for op, rows in tables.items():
            cols = list(dict.fromkeys(c for r in rows for c in r))
            lines.append(f"### {op}")
            if op in kept:
                lines.append("")
                lines.append("(From an earlier run today, with that run's machine: "
                             + ", ".join(f"{k} {v}" for k, v in kept[op]["machine"].items()) + ".)")
            lines.append("")
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for r in rows:
                lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
            lines.append("")
        return "\n".join(lines)

    def save(self):
        if not self.rows:
            return None
        os.makedirs(RESULTS_DIR, exist_ok=True)
        self._load_kept()
        path = self._path()
        kept = self._kept_tables()
        with open(path + ".json", "w") as f:
            json.dump({"machine": self.machine, "tables": {**{op: k["rows"] for op, k in kept.items()},
                                                          **self._tables()},
                       "kept machine": {op: k["machine"] for op, k in kept.items()}}, f, indent=1)
        with open(path + ".md", "w") as f:
            f.write(self.markdown() + "\n")
        return path


def _fmt(x):
    if isinstance(x, float):
        if x == 0 or abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)
