"""integrated_gradients, IntegratedGradients and LayerIntegratedGradients: Captum as the oracle, completeness,
streaming, adaptive mode and errors."""
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fastml
from fastml.ops.integrated_gradients import driver, quadrature
from fastml.testing import assert_close

captum_attr = pytest.importorskip("captum.attr")

# Captum multiplies by float32 step sizes (and builds Riemann alphas in float32) whatever the input dtype, so
# float64 results agree with it to float32 precision.
CAPTUM_TOL = dict(rtol=1e-5, atol=1e-6)


def gelu_mlp(d_in=6, d_out=4, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, d_out)).to(dtype)


class TwoInput(nn.Module):
    """Two inputs, an additional tensor argument (per example) and a non-tensor one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(5, 8).double()
        self.b = nn.Linear(3, 8).double()
        self.out = nn.Linear(8, 4).double()

    def forward(self, x1, x2, extra=None, scale=1.0):
        h = torch.tanh(self.a(x1) + self.b(x2))
        if extra is not None:
            h = h * extra
        return self.out(h) * scale


class Counter:
    """Wraps a model and counts the rows (and calls) it sees."""

    def __init__(self, model):
        self.model, self.rows, self.calls, self.max_rows = model, 0, 0, 0

    def __call__(self, x, *args):
        self.rows += x.shape[0]
        self.calls += 1
        self.max_rows = max(self.max_rows, x.shape[0])
        return self.model(x, *args)


def both(inputs, baselines=None, target=None, model=None, **kw):
    model = model if model is not None else gelu_mlp()
    ours = fastml.IntegratedGradients(model).attribute(inputs, baselines, target, **kw)
    theirs = captum_attr.IntegratedGradients(model).attribute(inputs, baselines, target, **kw)
    return ours, theirs


def _close(a, b):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y, **CAPTUM_TOL)
    else:
        assert_close(a, b, **CAPTUM_TOL)


@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle", "gausslegendre"])
@pytest.mark.parametrize("n_steps", [2, 7, 50])
def test_methods_match_captum(method, n_steps):
    x = torch.randn(5, 6, dtype=torch.float64)
    (a, d), (ca, cd) = both(x, None, 2, n_steps=n_steps, method=method, return_convergence_delta=True)
    _close(a, ca)
    assert_close(d, cd, **CAPTUM_TOL)


@pytest.mark.parametrize("baselines", ["none", "scalar", "tensor", "row", "int_scalar"])
def test_baseline_forms_match_captum(baselines):
    x = torch.randn(4, 6, dtype=torch.float64)
    b = {"none": None, "scalar": 0.5, "tensor": torch.randn(4, 6, dtype=torch.float64),
         "row": torch.randn(1, 6, dtype=torch.float64), "int_scalar": 1}[baselines]
    _close(*both(x, b, 1, n_steps=9))


@pytest.mark.parametrize("form", ["int", "tensor1", "list", "tensor"])
def test_target_forms_match_captum(form):
    x = torch.randn(4, 6, dtype=torch.float64)
    target = {"int": 3, "tensor1": torch.tensor(2), "list": [0, 3, 1, 1], "tensor": torch.tensor([1, 0, 3, 2])}[form]
    _close(*both(x, None, target, n_steps=8, method="riemann_middle"))


def test_target_none_and_tuple_match_captum():
    torch.manual_seed(3)
    scalar_model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    _close(*both(x, None, None, model=scalar_model, n_steps=6))
    seq_model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Unflatten(1, (3, 4))).double()
    _close(*both(x, None, (1, 2), model=seq_model, n_steps=6))
    _close(*both(x, None, [(0, 1), (2, 3), (1, 0)], model=seq_model, n_steps=6))


@pytest.mark.parametrize("internal_batch_size", [None, 3, 8, 20])
def test_tuple_inputs_additional_args_and_batching_match_captum(internal_batch_size):
    model = TwoInput()
    x1, x2 = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    extra = torch.rand(4, 8, dtype=torch.float64) + 0.5
    kw = dict(additional_forward_args=(extra, 2.0), n_steps=10, internal_batch_size=internal_batch_size,
              return_convergence_delta=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # internal_batch_size 3 < 4 examples warns in both libraries
        (a, d), (ca, cd) = both((x1, x2), (0.1, torch.zeros(1, 3, dtype=torch.float64)), [0, 1, 2, 3], model=model,
                                **kw)
    _close(a, ca)
    assert_close(d, cd, **CAPTUM_TOL)


def test_multiply_by_inputs_false_matches_captum():
    model, x = gelu_mlp(), torch.randn(3, 6, dtype=torch.float64)
    a = fastml.IntegratedGradients(model, multiply_by_inputs=False).attribute(x, target=0, n_steps=5)
    ca = captum_attr.IntegratedGradients(model, multiply_by_inputs=False).attribute(x, target=0, n_steps=5)
    _close(a, ca)


def test_float32_matches_captum():
    model, x = gelu_mlp(dtype=torch.float32), torch.randn(3, 6)
    a, ca = both(x, None, 1, model=model, n_steps=20)
    assert a.dtype == torch.float32
    assert_close(a, ca)


def test_trapezoid_is_a_correct_rule():
    alphas, weights = quadrature.rule("riemann_trapezoid", 5)
    assert abs(weights.sum() - 1.0) < 1e-15
    assert alphas[0] == 0.0 and alphas[-1] == 1.0
    # A linear model is integrated exactly by any rule whose weights sum to 1: completeness holds exactly.
    torch.manual_seed(0)
    lin = nn.Linear(6, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    a = fastml.integrated_gradients(lin, x, target=1, n_steps=5, method="riemann_trapezoid")
    assert_close(a, lin.weight[1].detach() * x)
    ca = captum_attr.IntegratedGradients(lin).attribute(x, target=1, n_steps=5, method="riemann_trapezoid")
    assert_close(ca, lin.weight[1].detach() * x * (1 - 1 / 5), **CAPTUM_TOL)  # Captum's weights sum to 1 - 1/n


def test_gauss_legendre_16_completeness_float64():
    model, x = gelu_mlp(), torch.randn(8, 6, dtype=torch.float64)
    _, delta = fastml.integrated_gradients(model, x, target=1, n_steps=16, return_convergence_delta=True)
    diff = model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]
    assert (delta.abs() / diff.abs()).max() < 1e-9


def test_chunk_size_invariance_and_streaming(monkeypatch):
    model, x = gelu_mlp(), torch.randn(3, 6, dtype=torch.float64)
    results = [fastml.integrated_gradients(model, x, target=2, n_steps=50, internal_batch_size=ibs)
               for ibs in (3, 21, 150)]
    counter = Counter(model)
    results.append(fastml.integrated_gradients(counter, x, target=2, n_steps=50))
    for r in results[1:]:
        assert_close(r, results[0], rtol=1e-12, atol=1e-14)
    assert counter.rows == 150 and counter.calls > 1  # never all steps at once
    monkeypatch.setattr(driver, "CHUNK_BYTES", 7 * x[0].numel() * x.element_size() * x.shape[0])
    counter = Counter(model)
    assert_close(fastml.integrated_gradients(counter, x, target=2, n_steps=50), results[0], rtol=1e-12, atol=1e-14)
    assert counter.max_rows == 7 * 3


class IdModel(nn.Module):
    """The GELU MLP with an extra argument carrying each row's example id, recorded per model call."""

    def __init__(self):
        super().__init__()
        self.model = gelu_mlp()
        self.calls = []

    def forward(self, x, ids):
        self.calls.append(ids.flatten().long().tolist())
        return self.model(x)


def test_adaptive_meets_rtol_and_drops_converged_examples():
    torch.manual_seed(5)
    model = IdModel()
    x = torch.randn(6, 6, dtype=torch.float64)
    x[0] *= 0.01  # nearly linear along its path: its first rule pair already meets the tolerance
    ids = torch.arange(6, dtype=torch.float64)[:, None]
    a, delta = fastml.integrated_gradients(model, x, target=0, n_steps=4, rtol=1e-8, additional_forward_args=ids,
                                           return_convergence_delta=True)
    diff = model.model(x)[:, 0] - model.model(torch.zeros_like(x))[:, 0]
    assert (delta.abs() <= 1e-8 * a.norm(dim=1)).all()  # completeness within the per-feature tolerance
    assert_close(delta, a.sum(1) - diff, rtol=1e-9, atol=1e-12)
    # Rows per example after the two end-point calls: example 0 only its first pair (Gauss-Legendre 4 and its
    # 9-node Kronrod extension share 4 nodes: 9 rows), every other example more.
    rows = [sum(call.count(e) for call in model.calls[2:]) for e in range(6)]
    first = 9
    assert rows[0] == first
    assert all(r > first for r in rows[1:]), rows
    # Example 0 is in no call after the first round (the first calls hold the first pair of every example).
    first_round = 0
    seen = 0
    while seen < 6 * first:
        seen += len(model.calls[2 + first_round])
        first_round += 1
    assert all(0 not in call for call in model.calls[2 + first_round:])
    reference = fastml.integrated_gradients(model.model, x, target=0, n_steps=64)
    assert_close(a, reference, rtol=1e-6, atol=1e-9)


def test_small_rules_are_chunked_too():
    # Tiny inputs fit any chunk budget; the rule's steps still never go through the model all at once.
    model, x = gelu_mlp(), torch.randn(2, 6, dtype=torch.float64)
    counter = Counter(model)
    got = fastml.integrated_gradients(counter, x, target=1, n_steps=16)
    assert counter.rows == 32 and counter.calls >= 2
    assert_close(got, fastml.integrated_gradients(model, x, target=1, n_steps=16, internal_batch_size=32),
                 rtol=1e-12, atol=1e-14)


def test_atol_alone_turns_on_adaptive_mode():
    model, x = gelu_mlp(), torch.randn(4, 6, dtype=torch.float64)
    counter = Counter(model)
    _, delta = fastml.integrated_gradients(counter, x, target=0, n_steps=2, atol=1e-9, return_convergence_delta=True)
    assert (delta.abs() <= 1e-9).all()
    assert counter.rows > 2 * 4 + 2 * 4  # refined beyond the first two-node rule


def test_adaptive_warns_naming_the_examples():
    model, x = gelu_mlp(), torch.randn(3, 6, dtype=torch.float64) * 3
    with pytest.warns(UserWarning, match=r"examples \[0, 1, 2\]"):
        fastml.integrated_gradients(model, x, target=0, n_steps=2, method="riemann_left", rtol=1e-12, max_steps=8)


class TextModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids, mask=None):
        h = torch.tanh(self.rnn(self.emb(ids)))
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.head(h.mean(1))


def test_layer_called_twice_matches_captum():
    # Captum represents a layer called more than once by its last call's activations and replaces every call.
    torch.manual_seed(4)
    lin, head = nn.Linear(5, 5).double(), nn.Linear(5, 3).double()

    def model(x):
        return head(lin(torch.tanh(lin(x))))

    x = torch.randn(3, 5, dtype=torch.float64)
    a = fastml.LayerIntegratedGradients(model, lin).attribute(x, target=2, n_steps=10)
    ca = captum_attr.LayerIntegratedGradients(model, lin).attribute(x, target=2, n_steps=10)
    _close(a, ca)


@pytest.mark.parametrize("to_input", [False, True])
def test_layer_ig_on_embeddings_matches_captum(to_input):
    model = TextModel().double()
    ids = torch.randint(1, 20, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.float64)
    layer = model.rnn if to_input else model.emb
    kw = dict(additional_forward_args=(mask,), n_steps=12, return_convergence_delta=True,
              attribute_to_layer_input=to_input)
    a, d = fastml.LayerIntegratedGradients(model, layer).attribute(ids, 0, [0, 2, 1], **kw)
    ca, cd = captum_attr.LayerIntegratedGradients(model, layer).attribute(ids, 0, [0, 2, 1], **kw)
    _close(a, ca)
    assert_close(d, cd, **CAPTUM_TOL)


def test_layer_ig_adaptive_and_internal_batch_size():
    model = TextModel().double()
    ids = torch.randint(1, 20, (4, 5))
    lig = fastml.LayerIntegratedGradients(model, model.emb)
    a = lig.attribute(ids, target=1, n_steps=30, internal_batch_size=8)
    ca = captum_attr.LayerIntegratedGradients(model, model.emb).attribute(ids, target=1, n_steps=30)
    _close(a, ca)
    a, delta = lig.attribute(ids, target=1, n_steps=4, return_convergence_delta=True, rtol=1e-7)
    diff = model(ids)[:, 1] - model(torch.zeros_like(ids))[:, 1]
    assert (delta.abs() <= 1e-7 * a.reshape(len(ids), -1).norm(dim=1)).all()
    assert_close(delta, a.reshape(len(ids), -1).sum(1) - diff, rtol=1e-9, atol=1e-12)
    reference = lig.attribute(ids, target=1, n_steps=64)
    per_feature = (a - reference).reshape(len(ids), -1).norm(dim=1) / reference.reshape(len(ids), -1).norm(dim=1)
    assert (per_feature <= 1e-7).all()


def test_progress_bar(capsys):
    fastml.integrated_gradients(gelu_mlp(), torch.randn(2, 6, dtype=torch.float64), target=0, n_steps=5,
                                progress=True)
    assert "integrated gradients" in capsys.readouterr().err


@pytest.mark.parametrize("case, exc, word", [
    ("n_steps", ValueError, "n_steps"),
    ("method", ValueError, "method"),
    ("baselines", ValueError, "baselines"),
    ("target", IndexError, "target"),
    ("target_list", IndexError, "target"),
    ("target_tuples", IndexError, "target"),
    ("baselines_list", TypeError, "baselines"),
    ("atol", ValueError, "atol"),
    ("int_inputs", TypeError, "inputs"),
    ("device", ValueError, "baselines"),
])
def test_errors_name_the_argument_and_leave_tensors_alone(case, exc, word):
    model = gelu_mlp()
    x = torch.randn(3, 6, dtype=torch.float64)
    b = torch.randn(3, 6, dtype=torch.float64)
    x0, b0 = x.clone(), b.clone()
    kw = dict(target=1)
    if case == "n_steps":
        kw["n_steps"] = 0
    elif case == "method":
        kw["method"] = "simpson"
    elif case == "baselines":
        b = torch.randn(2, 6, dtype=torch.float64)
        b0 = b.clone()
    elif case == "target":
        kw["target"] = 4
    elif case == "target_list":
        kw["target"] = [0, 1, 9]
    elif case == "target_tuples":
        kw["target"] = [(0, 1)] * 3  # two indices for an output with one dim after the batch
    elif case == "baselines_list":
        b = [0.0]
    elif case == "atol":
        kw["atol"] = -1.0
    elif case == "int_inputs":
        x = torch.randint(0, 5, (3, 6))
        x0 = x.clone()
    elif case == "device":
        b = torch.empty(3, 6, dtype=torch.float64, device="meta")
    with pytest.raises(exc, match=word):
        fastml.integrated_gradients(model, x, b, **kw)
    assert torch.equal(x, x0)
    if isinstance(b, torch.Tensor) and b.device.type != "meta":
        assert torch.equal(b, b0)


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4), scale=st.floats(0.1, 2.0))
def test_completeness_property(seed, batch, scale):
    torch.manual_seed(seed)
    model = gelu_mlp(seed=seed)
    x = torch.randn(batch, 6, dtype=torch.float64) * scale
    base = torch.randn(1, 6, dtype=torch.float64) * 0.1
    attr, delta = fastml.integrated_gradients(model, x, base, target=seed % 4, n_steps=24,
                                              return_convergence_delta=True)
    diff = model(x)[:, seed % 4] - model(base.expand_as(x))[:, seed % 4]
    assert_close(attr.sum(1), diff, rtol=1e-8, atol=1e-10)
    assert_close(delta, attr.sum(1) - diff, rtol=1e-9, atol=1e-12)


def test_layer_ig_errors_name_the_argument():
    model = TextModel().double()
    ids = torch.randint(1, 20, (2, 4))
    with pytest.raises(TypeError, match="layer"):
        fastml.LayerIntegratedGradients(model, "emb")
    with pytest.raises(ValueError, match="layer"):
        fastml.LayerIntegratedGradients(model, nn.Linear(2, 2)).attribute(ids, target=0)  # never called
    lig = fastml.LayerIntegratedGradients(model, model.emb)
    with pytest.raises(TypeError, match="grad_kwargs"):
        lig.attribute(ids, target=0, grad_kwargs=[("retain_graph", True)])
    with pytest.raises(IndexError, match="target"):
        lig.attribute(ids, target=3)
    with pytest.raises(ValueError, match="n_steps"):
        lig.attribute(ids, target=0, n_steps=0)
