"""A small hierarchical VAE trained with fastml's fused Gaussian ops, on generated images.

The data are 8 x 8 binary images of one random axis-aligned rectangle each, with 2% of the pixels flipped: a
four-number latent structure (the rectangle's corners) that a VAE with a few latent dims can find. The model has
two latent groups in the style of NVAE:

  - z1 (8 dims) with the prior N(0, 1);
  - z2 (8 dims) with a learned prior p(z2 | z1), whose posterior is parameterized *relative* to that prior
    (residual=True: the encoder outputs an offset and a log variance ratio).

Every sample and KL comes from `fastml.gaussian_sample_kl` (one fused pass; the backward regenerates the noise from
a seed instead of storing it), the KL weight follows `fastml.kl_warmup`, the two groups' KLs are balanced with
`fastml.kl_balance` during the warm-up, and the decoder's weights carry NVAE's `fastml.spectral_penalty`.

Each epoch prints the KL weight used and the ELBO (log-likelihood lower bound, nats per image, KL weight 1) on the
training and the held-out images; the held-out ELBO rises as the model learns. Run from the repository root:

    .venv/bin/python examples/vae.py            # about a minute on a CPU
    .venv/bin/python examples/vae.py --quick    # a few seconds
"""
import argparse
import os
import time

import torch
from torch import nn
import torch.nn.functional as F

import fastml

SIDE = 8
PIXELS = SIDE * SIDE


def rectangles(n, generator, flip=0.02):
    """n binary images [n, 64], each one random rectangle, with `flip` of the pixels flipped."""
    corners = torch.randint(0, SIDE, (n, 4), generator=generator)
    x0, x1 = corners[:, 0].minimum(corners[:, 1]), corners[:, 0].maximum(corners[:, 1])
    y0, y1 = corners[:, 2].minimum(corners[:, 3]), corners[:, 2].maximum(corners[:, 3])
    r = torch.arange(SIDE)
    inside_x = (r[None, :] >= x0[:, None]) & (r[None, :] <= x1[:, None])
    inside_y = (r[None, :] >= y0[:, None]) & (r[None, :] <= y1[:, None])
    img = (inside_y[:, :, None] & inside_x[:, None, :]).float().reshape(n, PIXELS)
    noise = torch.rand(n, PIXELS, generator=generator) < flip
    return torch.where(noise, 1.0 - img, img)


class VAE(nn.Module):
    def __init__(self, hidden=128, z1=8, z2=8):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(PIXELS, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU())
        self.q1 = nn.Linear(hidden, 2 * z1)
        self.prior2 = nn.Sequential(nn.Linear(z1, hidden), nn.ELU(), nn.Linear(hidden, 2 * z2))
        self.q2 = nn.Linear(hidden + z1, 2 * z2)
        self.dec = nn.Sequential(nn.Linear(z1 + z2, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
                                 nn.Linear(hidden, PIXELS))

    def forward(self, x, generator):
        """(reconstruction log-likelihood per image [B], KL per group [2, B])."""
        h = self.enc(x)
        mu1, lv1 = self.q1(h).chunk(2, dim=1)
        # NVAE's soft clamp keeps early, wild encoder outputs from overflowing exp(logvar)
        z1, kl1 = fastml.gaussian_sample_kl(mu1, lv1, soft_clamp=5.0, generator=generator)
        pm2, plv2 = self.prior2(z1).chunk(2, dim=1)
        dmu2, dlv2 = self.q2(torch.cat((h, z1), dim=1)).chunk(2, dim=1)
        z2, kl2 = fastml.gaussian_sample_kl(dmu2, dlv2, pm2, plv2, residual=True, soft_clamp=5.0,
                                            generator=generator)
        logits = self.dec(torch.cat((z1, z2), dim=1))
        loglik = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=1)
        return loglik, torch.stack((kl1, kl2))


@torch.no_grad()
def elbo(model, data, generator, batch=500):
    total, kls = 0.0, torch.zeros(2)
    for i in range(0, len(data), batch):
        loglik, kl = model(data[i:i + batch], generator)
        total += (loglik - kl.sum(0)).sum().item()
        kls += kl.sum(1)
    return total / len(data), (kls / len(data)).tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller run for the tests: a few seconds")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny models: one thread beats several, above all on a busy machine
    n_train, n_test, epochs = (2000, 500, 4) if args.quick else (8000, 2000, 20)
    epochs = args.epochs or epochs
    batch = 100
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train, test = rectangles(n_train, g), rectangles(n_test, g)
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps_per_epoch = n_train // batch
    warmup = max(1, (epochs * steps_per_epoch) // 3)
    noise = torch.Generator().manual_seed(args.seed + 1)
    spec_state = None
    spec_weights = [m.weight for m in model.dec if isinstance(m, nn.Linear)]
    start_elbo, _ = elbo(model, test, noise)
    print(f"data: {n_train} training / {n_test} held-out 8x8 rectangle images; latent groups z1 (prior N(0,1)) and "
          f"z2 (learned prior, residual posterior); KL warm-up over {warmup} steps")
    print(f"before training: held-out ELBO {start_elbo:8.2f} nats/image")
    step = 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(n_train, generator=g)
        model.train()
        for i in range(0, n_train, batch):
            x = train[perm[i:i + batch]]
            beta = fastml.kl_warmup(step, warmup_steps=warmup, min_coeff=1e-2)
            loglik, kl = model(x, noise)
            balanced, coeffs = fastml.kl_balance(kl, kl_coeff=beta)
            spec, spec_state = fastml.spectral_penalty(spec_weights, state=spec_state)
            loss = (balanced - loglik).mean() + 1e-3 * beta * spec
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        tr, _ = elbo(model, train, noise)
        te, kls = elbo(model, test, noise)
        print(f"epoch {epoch:2d}  KL weight {beta:.3f}  train ELBO {tr:8.2f}  held-out ELBO {te:8.2f}  "
              f"KL z1 {kls[0]:5.2f} z2 {kls[1]:5.2f}  group coefficients {coeffs[0].item():.2f}/"
              f"{coeffs[1].item():.2f}  ({time.perf_counter() - t0:.1f} s)")
    print(f"held-out ELBO: {start_elbo:.2f} -> {te:.2f} nats/image (higher is better)")


if __name__ == "__main__":
    main()
