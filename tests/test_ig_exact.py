"""method="exact": IG of piecewise-linear models by walking the path from kink to kink.

Checked against the maths (completeness, path additivity) and against a fine composite midpoint rule, on models
written with modules and with functional calls; models that are not piecewise linear are refused by name."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastml
from fastml.testing import assert_close



@pytest.fixture(autouse=True)
def one_thread():
    # The models here are tiny: one thread is faster than two (and far faster on a loaded machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
    return bn


class ModuleCNN(nn.Module):
    """Conv + batch norm with statistics + ReLU, max pooling, a residual block, ReLU6, LeakyReLU, avg pool."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), _bn(4), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), _bn(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                   _bn(4))
        self.head = nn.Sequential(nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6),
                                  nn.LeakyReLU(0.2), nn.Linear(6, 3))

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.block(h))


class FunctionalCNN(nn.Module):
    """The same kind of network written with functional calls and tensor methods."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.w1, self.b1 = nn.Parameter(torch.randn(3, 2, 3, 3) * 0.5), nn.Parameter(torch.randn(3) * 0.3)
        self.register_buffer("mean", torch.randn(3) * 0.2)
        self.register_buffer("var", torch.rand(3) + 0.5)
        self.w2, self.b2 = nn.Parameter(torch.randn(3, 12) * 0.5), nn.Parameter(torch.randn(3) * 0.3)

    def forward(self, x):
        h = F.conv2d(x, self.w1, self.b1, padding=1)
        h = F.batch_norm(h, self.mean, self.var, training=False)
        h = torch.relu(h) + 0.5 * h.clamp(-0.3, 0.4) - torch.maximum(h, -h.abs() + 0.1).mean((1, 2, 3), keepdim=True)
        h = F.max_pool2d(F.pad(h, (1, 0, 1, 0)), 2)
        h = h.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 3).mean(1)
        h = torch.cat([h, F.leaky_relu(-h), F.hardtanh(h, -0.2, 0.2), h.relu() - torch.minimum(h, h * 0.5)], 1)
        return F.linear(h, self.w2, self.b2)


def relu_mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()


MODELS = {"mlp": (relu_mlp, (3, 5)), "module_cnn": (lambda: ModuleCNN().double().eval(), (2, 2, 6, 6)),
          "functional_cnn": (lambda: FunctionalCNN().double().eval(), (2, 2, 5, 5))}


def _setup(kind):
    build, shape = MODELS[kind]
    torch.manual_seed(4)
    return build(), torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64) * 0.3


def _flat(a):
    return a.reshape(a.shape[0], -1)


@pytest.mark.parametrize("kind", list(MODELS))
def test_completeness_and_path_additivity(kind):
    model, x, base = _setup(kind)
    attr, delta = fastml.integrated_gradients(model, x, base, target=1, method="exact",
                                              return_convergence_delta=True)
    with torch.no_grad():
        diff = model(x)[:, 1] - model(base)[:, 1]
    assert (delta.abs() <= 1e-10 * diff.abs().clamp(min=1)).all(), (delta, diff)
    assert_close(_flat(attr).sum(1), diff, rtol=0, atol=1e-10)
    # Additivity over a split of the path at m = x' + beta (x - x'), feature by feature.
    m = base + 0.37 * (x - base)
    first = fastml.integrated_gradients(model, m, base, target=1, method="exact")
    second = fastml.integrated_gradients(model, x, m, target=1, method="exact")
    scale = attr.abs().max()
    assert ((first + second - attr).abs().max() / scale) < 1e-10


@pytest.mark.parametrize("kind", list(MODELS))
def test_agrees_with_a_fine_midpoint_rule(kind):
    model, x, base = _setup(kind)
    x, base = x[:1], base[:1]
    exact = fastml.integrated_gradients(model, x, base, target=2, method="exact")
    fine = fastml.integrated_gradients(model, x, base, target=2, n_steps=2**16, method="riemann_middle",
                                       internal_batch_size=2**14)
    # The midpoint rule's own error on a piecewise-constant integrand: at most a node spacing per kink.
    assert (exact - fine).abs().max() <= 1e-5 * exact.abs().max()
    assert (exact - fine).abs().max() > 0  # the two computations really differ


def test_functional_and_module_relu_agree():
    torch.manual_seed(5)
    lin1, lin2 = nn.Linear(4, 6).double(), nn.Linear(6, 2).double()
    module = nn.Sequential(lin1, nn.ReLU(), lin2)

    def functional(x):
        return F.linear(torch.clamp(F.linear(x, lin1.weight, lin1.bias), min=0), lin2.weight, lin2.bias)

    x = torch.randn(3, 4, dtype=torch.float64)
    a = fastml.integrated_gradients(module, x, target=0, method="exact")
    b = fastml.integrated_gradients(functional, x, target=0, method="exact")
    assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_options_targets_additional_args_tuple_inputs_and_batching():
    torch.manual_seed(6)
    a_lin, b_lin, head = nn.Linear(4, 6).double(), nn.Linear(3, 6).double(), nn.Linear(6, 3).double()

    def model(x1, x2, mask, scale):
        return head(torch.relu(a_lin(x1) + b_lin(x2)) * mask) * scale

    x1, x2 = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    mask = (torch.rand(4, 6) > 0.3).double()
    kw = dict(additional_forward_args=(mask, 2.0), target=[0, 2, 1, 1])
    exact, delta = fastml.integrated_gradients(model, (x1, x2), (0.1, 0.0), method="exact",
                                               return_convergence_delta=True, internal_batch_size=3, **kw)
    assert delta.abs().max() < 1e-10
    fine = fastml.integrated_gradients(model, (x1, x2), (0.1, 0.0), n_steps=2**14, method="riemann_middle",
                                       internal_batch_size=2**14, **kw)
    for e, f in zip(exact, fine):
        assert (e - f).abs().max() < 1e-5 * e.abs().max()
    raw = fastml.integrated_gradients(model, (x1, x2), (0.1, 0.0), method="exact", multiply_by_inputs=False, **kw)
    assert_close(raw[0] * (x1 - 0.1), exact[0], rtol=1e-12, atol=1e-14)
    assert_close(raw[1] * x2, exact[1], rtol=1e-12, atol=1e-14)


class TextModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.emb = nn.Embedding(20, 6)
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = torch.relu(self.proj(self.emb(ids)))
        return self.head(F.max_pool2d(h.unsqueeze(1), (ids.shape[1], 1)).flatten(1))


def test_layer_ig_exact_on_embeddings():
    model = TextModel().double()
    ids = torch.randint(1, 20, (3, 5))
    lig = fastml.LayerIntegratedGradients(model, model.emb)
    attr, delta = lig.attribute(ids, 0, [0, 2, 1], method="exact", return_convergence_delta=True)
    assert delta.abs().max() < 1e-10
    fine = lig.attribute(ids, 0, [0, 2, 1], n_steps=2**16, method="riemann_middle", internal_batch_size=2**15)
    assert (attr - fine).abs().max() < 1e-5 * attr.abs().max()


def test_refuses_what_is_not_piecewise_linear():
    torch.manual_seed(8)
    gelu = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 2)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"method='exact'.*gelu"):
        fastml.integrated_gradients(gelu, x, target=0, method="exact")
    with pytest.raises(ValueError, match=r"method='exact'.*mul.*both depend on the path"):
        fastml.integrated_gradients(lambda z: (z * z).sum(1), x, method="exact")
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double().train()
    with pytest.raises(ValueError, match=r"method='exact'.*training mode"):
        fastml.integrated_gradients(bn, x, target=0, method="exact")
    # Non-linear work that does not depend on the path is fine.
    fastml.integrated_gradients(lambda z: z @ torch.tanh(torch.ones(4, 2, dtype=torch.float64)), x, target=1,
                                method="exact")


def test_max_segments_and_option_errors():
    model, x, _ = _setup("mlp")
    with pytest.raises(ValueError, match="max_segments=2"):
        fastml.integrated_gradients(model, x * 10, target=0, method="exact", max_segments=2)
    with pytest.raises(ValueError, match="max_segments"):
        fastml.integrated_gradients(model, x, target=0, method="exact", max_segments=0)
    with pytest.raises(ValueError, match="n_steps"):
        fastml.integrated_gradients(model, x, target=0, method="exact", n_steps=50)
    with pytest.raises(ValueError, match="rtol"):
        fastml.integrated_gradients(model, x, target=0, method="exact", rtol=1e-3)
