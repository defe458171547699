"""Integrated gradients: fastml against Captum on the benchmark CNN and a float64 GELU MLP.

Per n_steps in {16, 50, 256}: wall time (median), peak memory (VmHWM of a fresh subprocess running only that call,
minus the process's VmHWM after set-up) and the completeness error |sum(attr) - (F(x) - F(x'))| / |F(x) - F(x')|.
Adaptive mode: rows through the model (delta evaluations included) to reach rtol 1e-3 and 1e-6 on the MLP, against
Captum's default call and the smallest fixed n_steps of Gauss-Legendre that reaches the same error.
Rows go to the suite's tables (benchmarks/results/). Nothing here asserts a speed.
"""
import statistics
import time

import pytest
import torch

captum_attr = pytest.importorskip("captum.attr")
import fastml  # noqa: E402

from runner import peak_memory_mb  # noqa: E402

STEPS = (16, 50, 256)

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

def _peak_mb(kind, lib, n_steps, device):
    setup = MODELS + f"import captum.attr\nmodel, x = build({kind!r}, {device!r})\n"
    return peak_memory_mb(setup, f"call({lib!r}, model, x, {n_steps})")


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
def test_ig_against_captum(benchmark, device, results, kind, n_steps):
    model, x = build(kind, device)
    row = {"model": kind, "n_steps": n_steps}
    rounds = 5 if n_steps <= 50 else 1
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
    results.add(f"integrated_gradients vs Captum ({device})", row)


class RowCounter:
    def __init__(self, model):
        self.model, self.rows = model, 0

    def __call__(self, x):
        self.rows += x.shape[0]
        return self.model(x)


@pytest.mark.parametrize("rtol", [1e-3, 1e-6])
def test_adaptive_model_evaluations(benchmark, device, results, rtol):
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
    results.add("integrated_gradients adaptive mode, model rows (float64 GELU MLP)",
                {"rtol": rtol, "adaptive rows": counter.rows, "adaptive rel. error": err,
                 "captum default rows": 50 * len(x), "captum default rel. error": captum_err,
                 "fixed n_steps for same error": fixed, "fixed rows (with delta)": (fixed + 2) * len(x)})
