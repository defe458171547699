"""Integrated gradients: fastml against Captum on the benchmark CNN and a float64 GELU MLP.

Per n_steps in {16, 50, 256}: wall time (median), peak memory (VmHWM of a fresh subprocess running only that call,
minus the process's VmHWM after set-up) and the completeness error |sum(attr) - (F(x) - F(x'))| / |F(x) - F(x')|.
Adaptive mode: rows through the model (delta evaluations included) to reach rtol 1e-3 and 1e-6 on the MLP, against
Captum's default call and the smallest fixed n_steps of Gauss-Legendre that reaches the same error.
Writes benchmarks/results/<date>-<host>-ig.{json,md}. Nothing here asserts a speed.
"""
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import pytest
import torch

captum_attr = pytest.importorskip("captum.attr")
import fastml  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (16, 50, 256)
ROWS = []  # one dict per measurement, written at the end of the module

MODELS = """
import torch
from torch import nn

def build(kind, device):
    torch.manual_seed(0)
    if kind == "cnn":
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                              nn.ReLU(), nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).to(device).eval()
        return model, torch.randn(8, 3, 64, 64, device=device)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                          nn.Linear(256, 10)).to(device, torch.float64)
    return model, torch.randn(16, 64, device=device, dtype=torch.float64)

def call(lib, model, x, n_steps):
    if lib == "captum":
        from captum.attr import IntegratedGradients
        return IntegratedGradients(model).attribute(x, target=3, n_steps=n_steps)
    import fastml
    return fastml.integrated_gradients(model, x, target=3, n_steps=n_steps)
"""
namespace = {}
exec(MODELS, namespace)  # the same definitions serve this process and the memory subprocesses
build, call = namespace["build"], namespace["call"]

PEAK_SCRIPT = MODELS + """
import sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
import captum.attr  # noqa: F401  (both libraries are loaded before the baseline reading)
import fastml  # noqa: F401
model, x = build(sys.argv[1], sys.argv[4])
before = hwm()
call(sys.argv[2], model, x, int(sys.argv[3]))
print(hwm() - before)
"""


def _device(request):
    return request.config.getoption("--device", default="cpu")


def _peak_mb(kind, lib, n_steps, device):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, kind, lib, str(n_steps), device], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _median_s(fn, rounds):
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _completeness(model, x, attr):
    with torch.no_grad():
        diff = model(x)[:, 3] - model(torch.zeros_like(x))[:, 3]
    return ((attr.reshape(len(x), -1).sum(1).double() - diff.double()).abs() / diff.double().abs()).max().item()


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("n_steps", STEPS)
def test_ig_against_captum(benchmark, request, kind, n_steps):
    device = _device(request)
    model, x = build(kind, device)
    row = {"model": kind, "n_steps": n_steps}
    rounds = 3 if n_steps <= 50 else 1
    # Alternate the two libraries so that both see the same machine load.
    t = {"captum": [], "fastml": []}
    for _ in range(rounds):
        for lib in t:
            t[lib].append(_median_s(lambda: call(lib, model, x, n_steps), 1))
    benchmark.pedantic(lambda: call("fastml", model, x, n_steps), rounds=1, iterations=1)
    for lib in t:
        row[f"{lib} ms"] = 1000 * statistics.median(t[lib])
        row[f"{lib} peak MB"] = _peak_mb(kind, lib, n_steps, device)
        row[f"{lib} rel. error"] = _completeness(model, x, call(lib, model, x, n_steps))
    row["speed-up"] = row["captum ms"] / row["fastml ms"]
    row["memory ratio"] = row["fastml peak MB"] / max(row["captum peak MB"], 1e-9)
    ROWS.append(row)


class RowCounter:
    def __init__(self, model):
        self.model, self.rows = model, 0

    def __call__(self, x):
        self.rows += x.shape[0]
        return self.model(x)


@pytest.mark.parametrize("rtol", [1e-3, 1e-6])
def test_adaptive_model_evaluations(benchmark, request, rtol):
    device = _device(request)
    model, x = build("mlp", device)
    counter = RowCounter(model)
    _, delta = benchmark.pedantic(
        lambda: fastml.integrated_gradients(counter, x, target=3, n_steps=4, rtol=rtol,
                                            return_convergence_delta=True), rounds=1, iterations=1)
    with torch.no_grad():
        diff = (model(x)[:, 3] - model(torch.zeros_like(x))[:, 3]).abs()
    err = (delta.abs() / diff).max().item()
    captum_err = _completeness(model, x, captum_attr.IntegratedGradients(model).attribute(x, target=3))
    fixed = next(n for n in range(1, 513)
                 if _completeness(model, x, fastml.integrated_gradients(model, x, target=3, n_steps=n)) <= err)
    ROWS.append({"model": "mlp adaptive", "rtol": rtol, "adaptive rows": counter.rows, "adaptive rel. error": err,
                 "captum default rows": 50 * len(x), "captum default rel. error": captum_err,
                 "fixed n_steps for same error": fixed, "fixed rows (with delta)": (fixed + 2) * len(x)})


def _markdown():
    lines = []
    for keys in ({"captum ms"}, {"adaptive rows"}):
        rows = [r for r in ROWS if keys <= r.keys()]
        if not rows:
            continue
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols)
                         + " |")
        lines.append("")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    if not ROWS:
        return
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    stem = os.path.join(ROOT, "benchmarks", "results",
                        f"{datetime.date.today().isoformat()}-{socket.gethostname()}-ig")
    text = "# Integrated gradients: fastml vs Captum\n\n" + _markdown()
    with open(stem + ".json", "w") as f:
        json.dump({"threads": torch.get_num_threads(), "rows": ROWS}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text)
    sys.stdout.write("\n" + text + f"\nSaved {stem}.json and {stem}.md\n")
