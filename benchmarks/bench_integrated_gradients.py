"""Integrated gradients: fastml against Captum on the benchmark CNN and a float64 GELU MLP.

Per n_steps in {16, 50, 256}: wall time (median), peak memory (VmHWM of a fresh subprocess running only that call,
minus the process's VmHWM after set-up) and the completeness error |sum(attr) - (F(x) - F(x'))| / |F(x) - F(x')|.
Adaptive mode: rows through the model (delta evaluations included) to reach rtol 1e-3 and 1e-6 on the MLP, against
Captum's default call and the smallest fixed n_steps of Gauss-Legendre that reaches the same error.
Per-feature accuracy on real architectures (transformers models built from small configs, random weights, no
downloads): a ReLU ResNet whose batch norms carry running statistics and affine terms, and BERT with
LayerIntegratedGradients on its embeddings, both float64. Per call: the per-feature error
max_b ||attr_b - ref_b|| / ||ref_b|| against a 1024-node float64 rule (riemann_middle for the ResNet, whose
integrand is piecewise constant; gausslegendre for BERT, whose integrand is smooth), model rows per example and time,
for Captum n=50, fastml n=50, fastml adaptive asked for the error Captum n=50 reaches (ResNet: with the default
method and with riemann_trapezoid) and for rtol=1e-3, and on the ResNet method="exact" (its error against the 1024-node rule is that rule's own error) with the segments it walked.
`python benchmarks/bench_integrated_gradients.py` prints that table alone.
Rows go to the suite's tables (benchmarks/results/). Nothing here asserts a speed.
"""
import statistics
import sys
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


# --- per-feature accuracy on transformers models -------------------------------------------------------------------

def resnet(device):
    """A ReLU ResNet (two basic stages) with batch norms given running statistics and affine terms, eval mode."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                          hidden_act="relu", num_labels=10)
    model = ResNetForImageClassification(config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    model = model.to(device, torch.float64).eval()
    return (lambda x: model(x).logits), torch.randn(8, 3, 16, 16, device=device, dtype=torch.float64)


def bert(device):
    """BERT for sequence classification from a small config; IG on the embeddings' output."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config).to(device, torch.float64).eval()
    ids = torch.randint(1, 200, (8, 12), device=device)
    return (lambda t: model(t).logits), ids, model.bert.embeddings


class _Rows:
    def __init__(self, fn):
        self.fn, self.rows = fn, 0

    def __call__(self, x):
        self.rows += x.shape[0]
        return self.fn(x)


def _err(a, ref):
    a, ref = a.reshape(len(a), -1), ref.reshape(len(ref), -1)
    return ((a - ref).norm(dim=1) / ref.norm(dim=1)).max().item()


def _timed(fn, rounds=3):
    out, times = None, []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def accuracy_rows(kind, device):
    """The rows of the per-feature accuracy table for `kind` ("resnet" or "bert")."""
    import warnings

    from fastml.ops.integrated_gradients import _problem, driver, exact

    if kind == "resnet":
        f, x = resnet(device)
        layer = None
        ours = lambda fn, **kw: fastml.integrated_gradients(fn, x, target=3, **kw)  # noqa: E731
        theirs = lambda fn: captum_attr.IntegratedGradients(fn).attribute(x, target=3)  # noqa: E731
        ref = ours(f, n_steps=1024, method="riemann_middle")
        adaptive_method = "riemann_trapezoid"
    else:
        f, x, layer = bert(device)
        ours = lambda fn, **kw: fastml.LayerIntegratedGradients(fn, layer).attribute(x, target=1, **kw)  # noqa: E731
        theirs = lambda fn: captum_attr.LayerIntegratedGradients(fn, layer).attribute(x, target=1)  # noqa: E731
        ref = ours(f, n_steps=1024)
        adaptive_method = "gausslegendre"
    rows = []

    def add(name, call, rounds=3, **extra):
        counter = _Rows(f)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(counter)
        attr, seconds = _timed(lambda: call(f), rounds)
        rows.append({"model": kind, "call": name, "per-feature error": _err(attr, ref),
                     "rows per example": counter.rows / len(x), "ms": 1000 * seconds,
                     "warned": bool(caught), **extra})
        return rows[-1]

    captum = add("captum n=50", theirs)
    add("fastml n=50", lambda fn: ours(fn))
    target = captum["per-feature error"]
    if kind == "resnet":  # the default method too: it switches to the trapezoid rules at the kinks it finds
        add(f"fastml adaptive rtol={target:.3g} (gausslegendre)", lambda fn: ours(fn, rtol=target))
    add(f"fastml adaptive rtol={target:.3g} ({adaptive_method})", lambda fn: ours(fn, rtol=target, method=adaptive_method))
    add(f"fastml adaptive rtol=1e-3 max_steps=4096 ({adaptive_method})",
        lambda fn: ours(fn, rtol=1e-3, method=adaptive_method, max_steps=4096), rounds=1)
    if kind == "resnet":
        problem = _problem.IGProblem(f, (x,), (torch.zeros_like(x),), 3, ())
        ends = exact.walk(problem, max_segments=10**6, max_rows=256, bar=driver.Progress(False, 0))
        add("fastml exact", lambda fn: ours(fn, method="exact"), rounds=1,
            segments=f"{min(len(e) for e in ends) - 1}-{max(len(e) for e in ends) - 1}")
    for r in rows:
        r["time vs captum"] = r["ms"] / captum["ms"]
    return rows


@pytest.mark.parametrize("kind", ["resnet", "bert"])
def test_per_feature_accuracy(benchmark, device, results, kind):
    pytest.importorskip("transformers")
    rows = benchmark.pedantic(lambda: accuracy_rows(kind, device), rounds=1, iterations=1)
    for row in rows:
        results.add("integrated_gradients per-feature error (float64, transformers models)", row)


if __name__ == "__main__":
    from runner import Results

    table = Results()
    table.machine["device"] = f"CPU, {torch.get_num_threads()} threads"
    for kind in sys.argv[1:] or ["resnet", "bert"]:
        for row in accuracy_rows(kind, "cpu"):
            table.rows.setdefault("integrated_gradients per-feature error (float64, transformers models)", []).append(row)
            print(row, flush=True)
    print(table.markdown())
