"""Noise, gradient penalty and virtual adversarial training on a classifier that sees few labels.

The task is the two-moons problem: 2-D points on two interleaved half circles, one class each, with only a handful
of labelled points (5 per class) and many unlabelled ones. A small MLP fitted to the labels alone draws its
boundary anywhere between them. The regularizers prefer functions that change little where the data are:

  - noise:   `fastml.noise_consistency`, the penalty E ||f(x + e) - f(x)||^2 on unlabelled points (to first order
             sigma^2 times the squared norm of the input Jacobian: input noise is a gradient penalty in disguise);
  - penalty: `fastml.gradient_penalty_backward` on the labelled loss, weight / 2 * ||dL/dx||^2, computed by the
             finite-difference trick (two first-order passes, no double backward); it sees the labelled points
             only, so it flattens the loss around them (wider margins) but cannot follow the unlabelled data;
  - VAT:     `fastml.vat_loss` on unlabelled points, the KL between the prediction at x and at the most
             sensitive nearby point (softmax_kl runs fused).

The script trains each variant from the same initializations over a few seeds and prints the mean held-out
accuracy. It also checks the finite-difference penalty gradient against the double-backward one on the model.
Run from the repository root:

    .venv/bin/python examples/regularizers.py            # under a minute on a CPU
    .venv/bin/python examples/regularizers.py --quick    # a few seconds
"""
import argparse
import os
import math
import time

import torch
from torch import nn
import torch.nn.functional as F

import fastml


def moons(n, generator, noise=0.1):
    """n points [n, 2] on two interleaved half circles and their classes [n]."""
    y = torch.randint(0, 2, (n,), generator=generator)
    t = torch.rand(n, generator=generator) * math.pi
    x = torch.stack((torch.cos(t), torch.sin(t)), dim=1)
    x = torch.where(y[:, None] == 1, torch.stack((1 - torch.cos(t), 0.5 - torch.sin(t)), dim=1), x)
    return x + noise * torch.randn(n, 2, generator=generator), y


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))


def train(method, seed, data, steps):
    (xl, yl), xu = data
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        opt.zero_grad()
        if method == "penalty":
            fastml.gradient_penalty_backward(lambda x: F.cross_entropy(model(x), yl), xl, weight=30.0,
                                             mode="finite_difference", h=1e-2)
        else:
            loss = F.cross_entropy(model(xl), yl)
            if method == "noise":
                loss = loss + 3.0 * fastml.noise_consistency(model, xu, sigma=0.15, generator=g)
            elif method == "VAT":
                loss = loss + fastml.vat_loss(model, xu, eps=0.3, generator=g)
            loss.backward()
        opt.step()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def check_penalty_modes(data):
    """Finite differences against double backward for the penalized gradient (float64 copy of the model)."""
    (xl, yl), _ = data
    model = make_model(0).double()
    grads = {}
    for mode, h in (("double_backward", 1e-2), ("finite_difference", 1e-5)):
        model.zero_grad()
        fastml.gradient_penalty_backward(lambda x: F.cross_entropy(model(x), yl), xl.double(), weight=1.0, mode=mode,
                                         h=h)
        grads[mode] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    exact = grads["double_backward"]
    return ((grads["finite_difference"] - exact).norm() / exact.norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and seeds, for the tests: a few seconds")
    ap.add_argument("--labels", type=int, default=5, help="labelled points per class")
    args = ap.parse_args()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny models: one thread beats several, above all on a busy machine
    steps, seeds = (150, 2) if args.quick else (500, 5)
    methods = ("plain", "noise", "penalty", "VAT")
    acc = {m: [] for m in methods}
    t0 = time.perf_counter()
    for seed in range(seeds):
        g = torch.Generator().manual_seed(1000 + seed)
        x, y = moons(2000, g)
        xl = torch.cat([x[y == c][:args.labels] for c in (0, 1)])
        yl = torch.cat([y[y == c][:args.labels] for c in (0, 1)])
        xu = x[:1000]
        xt, yt = moons(2000, g)
        data = ((xl, yl), xu)
        if seed == 0:
            rel = check_penalty_modes(data)
            print(f"gradient penalty: finite differences vs double backward, relative difference {rel:.2e}")
        for m in methods:
            acc[m].append(accuracy(train(m, seed, data, steps), xt, yt))
    print(f"two moons, {2 * args.labels} labels, 1000 unlabelled points, {steps} steps, {seeds} seeds "
          f"({time.perf_counter() - t0:.0f} s)")
    for m in methods:
        a = torch.tensor(acc[m])
        print(f"{m:8s} held-out accuracy {a.mean().item():.3f}  (per seed: {' '.join(f'{v:.3f}' for v in acc[m])})")


if __name__ == "__main__":
    main()
