"""Adaptive mode's per-feature error control (subdivision of [0, 1]), its options, and the dtype of the nodes."""
import warnings

import pytest
import torch
from torch import nn

import fastml
from fastml.testing import assert_close
from test_ig_exact import one_thread  # noqa: F401  (autouse: the models here are tiny)


class Rows:
    def __init__(self, model):
        self.model, self.rows = model, 0

    def __call__(self, *args):
        self.rows += args[0].shape[0]
        return self.model(*args)


def relu_cnn():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), bn, nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)).double().eval()


def gelu_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)).double()


def _per_feature_error(a, ref):
    a, ref = a.reshape(len(a), -1), ref.reshape(len(ref), -1)
    return (a - ref).norm(dim=1) / ref.norm(dim=1)


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_per_feature_error_below_rtol_on_a_relu_cnn(method):
    model = relu_cnn()
    torch.manual_seed(2)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    exact = fastml.integrated_gradients(model, x, target=1, method="exact")
    # gausslegendre finds the kinks (a Gauss-Kronrod half keeping more than KINK_SHARE of its parent's error) and
    # switches to the trapezoid rules there: both meet 1e-3 within the default max_steps, no example gives up.
    for rtol in (1e-2, 1e-3):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            a, delta = fastml.integrated_gradients(model, x, target=1, rtol=rtol, method=method,
                                                   return_convergence_delta=True)
        assert (_per_feature_error(a, exact) <= rtol).all(), (rtol, _per_feature_error(a, exact))
        assert (delta.abs() <= rtol * a.reshape(3, -1).norm(dim=1)).all()


def test_per_feature_error_below_rtol_on_a_smooth_model_and_few_rows():
    model = gelu_mlp()
    torch.manual_seed(3)
    x = torch.randn(5, 6, dtype=torch.float64) * 2
    ref = fastml.integrated_gradients(model, x, target=2, n_steps=200)
    for rtol in (1e-3, 1e-6, 1e-9):
        a = fastml.integrated_gradients(model, x, target=2, rtol=rtol)
        assert (_per_feature_error(a, ref) <= rtol).all(), (rtol, _per_feature_error(a, ref))
    # n_steps left unset starts from a 5-node pair: a loose tolerance on a smooth model costs far fewer model rows
    # than Captum's default 50 steps per example.
    counter = Rows(model)
    fastml.integrated_gradients(counter, x, target=2, rtol=1e-3)
    assert counter.rows <= 2 * 5 + 5 * 15


def test_completeness_alone_is_not_enough():
    # A ReLU CNN whose completeness error meets the tolerance while single features do not: adaptive mode keeps
    # refining until the per-feature estimate does too.
    model = relu_cnn()
    torch.manual_seed(4)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64) * 3
    exact = fastml.integrated_gradients(model, x, target=0, method="exact")
    a = fastml.integrated_gradients(model, x, target=0, rtol=1e-3, method="riemann_trapezoid")
    assert (_per_feature_error(a, exact) <= 1e-3).all()


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a, self.b, self.out = nn.Linear(4, 8).double(), nn.Linear(3, 8).double(), nn.Linear(8, 3).double()

    def forward(self, x1, x2, mask, scale):
        return self.out(torch.relu(self.a(x1) + self.b(x2)) * mask) * scale


@pytest.mark.parametrize("multiply_by_inputs", [True, False])
def test_options_in_adaptive_mode(multiply_by_inputs):
    model = TwoInputs()
    torch.manual_seed(6)
    x1, x2 = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    mask = (torch.rand(4, 8) > 0.3).double()
    kw = dict(additional_forward_args=(mask, 2.0), target=[0, 2, 1, 1], multiply_by_inputs=multiply_by_inputs)
    exact = fastml.integrated_gradients(model, (x1, x2), (0.1, 0.0), method="exact", **kw)
    a, delta = fastml.integrated_gradients(model, (x1, x2), (0.1, 0.0), rtol=1e-4, method="riemann_trapezoid",
                                           internal_batch_size=5, return_convergence_delta=True, **kw)
    norm = torch.cat([e.reshape(4, -1) for e in exact], 1).norm(dim=1)
    err = torch.cat([(p - q).reshape(4, -1) for p, q in zip(a, exact)], 1).norm(dim=1)
    assert (err <= 1e-4 * norm).all()
    assert_close(delta, sum(t.reshape(4, -1).sum(1) for t in a) - model(x1, x2, mask, 2.0)[range(4), [0, 2, 1, 1]]
                 + model(torch.full_like(x1, 0.1), torch.zeros_like(x2), mask, 2.0)[range(4), [0, 2, 1, 1]],
                 rtol=1e-9, atol=1e-12)


def test_layer_ig_adaptive_on_a_relu_text_model():
    torch.manual_seed(7)
    emb, proj, head = nn.Embedding(20, 6).double(), nn.Linear(6, 6).double(), nn.Linear(6, 3).double()

    def model(ids):
        return head(torch.relu(proj(emb(ids))).mean(1))

    ids = torch.randint(1, 20, (3, 5))
    lig = fastml.LayerIntegratedGradients(model, emb)
    exact = lig.attribute(ids, target=2, method="exact")
    a = lig.attribute(ids, target=2, rtol=1e-4, method="riemann_trapezoid")
    assert (_per_feature_error(a, exact) <= 1e-4).all()


def test_nodes_follow_the_widest_input_dtype():
    # F separates into a float32 part and a float64 part: the float64 input's attributions must not depend on the
    # other input's dtype (float32 nodes would move them by ~1e-8).
    torch.manual_seed(8)
    w = torch.randn(5, dtype=torch.float64)

    def model(x1, x2):
        return torch.sin(x1).sum(1, keepdim=True).double() + torch.sin(x2 * w).sum(1, keepdim=True)

    x1, x2 = torch.randn(3, 4), torch.randn(3, 5, dtype=torch.float64) * 3
    mixed = fastml.integrated_gradients(model, (x1, x2), target=0, n_steps=7)
    wide = fastml.integrated_gradients(model, (x1.double(), x2), target=0, n_steps=7)
    assert mixed[0].dtype == torch.float32 and mixed[1].dtype == torch.float64
    assert (mixed[1] - wide[1]).abs().max() < 1e-13
    # Adaptive mode too (its refinement decisions see the float32 part, whose rounding bounds the tolerance it can
    # meet, so the two calls agree to about the tolerance).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adaptive = fastml.integrated_gradients(model, (x1, x2), target=0, n_steps=8, rtol=1e-6)
        adaptive_wide = fastml.integrated_gradients(model, (x1.double(), x2), target=0, n_steps=8, rtol=1e-6)
    assert adaptive[1].dtype == torch.float64
    assert (adaptive[1] - adaptive_wide[1]).abs().max() < 1e-5 * adaptive_wide[1].abs().max()


def test_max_steps_below_the_first_rule_is_refused():
    with pytest.raises(ValueError, match="max_steps"):
        fastml.integrated_gradients(gelu_mlp(), torch.randn(2, 6, dtype=torch.float64), target=0, rtol=1e-3,
                                    max_steps=4)
    with pytest.raises(ValueError, match="max_steps"):
        fastml.integrated_gradients(gelu_mlp(), torch.randn(2, 6, dtype=torch.float64), target=0, n_steps=10,
                                    rtol=1e-3, max_steps=20)
