"""Integrated gradients on a small convnet: does the attribution find the object the model looks at?

The script makes its own data: 28x28 grey images with faint noise, one bright square and one dim decoy square in
another quadrant; the class is the quadrant of the bright square (4 classes). It trains a small convnet
(conv/ReLU/pool twice, then a linear layer) for a short while, attributes the predictions on a batch of held-out
images with `fastml.integrated_gradients` (black-image baseline) and prints

  - the completeness error: sum of the attributions against F(x) - F(baseline), which integrated gradients keeps
    up to the quadrature error,
  - the share of the positive attribution that falls inside the bright square's box (against the box's share of
    the image, and against the share in the decoy's box), for the shown example and over the batch,

and writes a PNG: the input on the left, the attribution heat map on the right (red positive, blue negative,
white zero; the bright square's box drawn in green), each pixel scaled up so that it can be seen.

Run (from the repository root, after `make test` has built .venv):

    .venv/bin/python examples/integrated_gradients.py                 # 10-20 s on a 2-core CPU
    .venv/bin/python examples/integrated_gradients.py --quick         # a few seconds
    .venv/bin/python examples/integrated_gradients.py --out ig.png --scale 8 --seed 0

The PNG is written with the standard library only (zlib + struct), so the example needs nothing beyond torch
and fastml.

The model is small: on a machine that other jobs keep busy, one thread per process (OMP_NUM_THREADS=1)
is often faster than torch's default.
"""
import argparse
import time

import torch
from torch import nn

import fastml
from png_writer import write_png  # examples/png_writer.py, beside this script

SIZE = 28  # image side, pixels
CLASSES = ("top-left", "top-right", "bottom-left", "bottom-right")


# --- data -------------------------------------------------------------------------------------------------------

def _squares(n, quadrant, generator):
    """Boxes [n, 4] (row0, col0, row1, col1; end exclusive) of squares of side 5..8, one inside each example's
    quadrant (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right), a pixel clear of the quadrant's border."""
    half = SIZE // 2
    side = torch.randint(5, 9, (n,), generator=generator)
    # Offsets 1 .. half - side - 1 inside the quadrant: a uniform draw scaled to each example's own range.
    room = (half - side - 1).float()
    r0 = 1 + (torch.rand(n, generator=generator) * room).long() + half * (quadrant >= 2).long()
    c0 = 1 + (torch.rand(n, generator=generator) * room).long() + half * (quadrant % 2)
    return torch.stack([r0, c0, r0 + side, c0 + side], 1)


def _paint(images, boxes, brightness):
    pix = torch.arange(SIZE)
    rows = (pix >= boxes[:, 0, None]) & (pix < boxes[:, 2, None])   # [n, 28]
    cols = (pix >= boxes[:, 1, None]) & (pix < boxes[:, 3, None])
    mask = (rows[:, :, None] & cols[:, None, :])[:, None]             # [n, 1, 28, 28]
    return torch.where(mask, brightness[:, None, None, None], images)


def make_images(n, generator):
    """n images [n, 1, 28, 28] in [0, 1]: faint noise, one bright square and one dim decoy square in another
    quadrant. Returns the images, the labels [n] (the bright square's quadrant) and the boxes [n, 4] of the bright
    and of the decoy square as (row0, col0, row1, col1), end exclusive."""
    images = 0.25 * torch.rand(n, 1, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    decoy_quadrant = (labels + torch.randint(1, 4, (n,), generator=generator)) % 4
    boxes, decoys = _squares(n, labels, generator), _squares(n, decoy_quadrant, generator)
    images = _paint(images, decoys, 0.35 + 0.15 * torch.rand(n, generator=generator))
    images = _paint(images, boxes, 0.75 + 0.25 * torch.rand(n, generator=generator))
    return images, labels, boxes, decoys


def make_model():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 14x14
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 7x7
        nn.Flatten(), nn.Linear(16 * 7 * 7, len(CLASSES)),
    )


def train(model, steps, batch, generator, device):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        x, y, _, _ = make_images(batch, generator)
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def box_share(attr, boxes):
    """Share of the positive attribution inside each example's box: attr [n, 1, H, W], boxes [n, 4] -> [n]."""
    pos = attr.clamp(min=0)[:, 0]
    inside = torch.zeros_like(pos, dtype=torch.bool)
    for i, (r0, c0, r1, c1) in enumerate(boxes.tolist()):
        inside[i, r0:r1, c0:c1] = True
    return (pos * inside).sum((1, 2)) / pos.sum((1, 2)).clamp(min=1e-12)


# --- PNG colours (the writer is png_writer.py) ---------------------------------------------------------------------

def grey(v):
    g = int(round(255 * min(max(v, 0.0), 1.0)))
    return (g, g, g)


def diverging(v):
    """v in [-1, 1] -> blue (negative) / white (0) / red (positive)."""
    v = min(max(v, -1.0), 1.0)
    fade = int(round(255 * (1 - abs(v))))
    return (255, fade, fade) if v >= 0 else (fade, fade, 255)


def picture(image, attr, box, scale):
    """The input (grey) and the attribution (diverging colours, box outlined in green) side by side, one white
    image-pixel between them, every pixel a scale x scale block. Size: (2 * 28 + 1) * scale by 28 * scale."""
    peak = float(attr.abs().max()) or 1.0
    r0, c0, r1, c1 = (int(v) for v in box)
    rows = []
    for r in range(SIZE):
        row_pixels = [grey(float(image[r, c])) for c in range(SIZE)] + [(255, 255, 255)]
        row_pixels += [diverging(float(attr[r, c]) / peak) for c in range(SIZE)]
        for dr in range(scale):
            line = bytearray()
            for j, px in enumerate(row_pixels):
                for dc in range(scale):
                    c = j - SIZE - 1  # column in the heat map, if j is there
                    y, x = r * scale + dr, c * scale + dc
                    on_box = (c >= 0 and r0 * scale <= y < r1 * scale and c0 * scale <= x < c1 * scale
                              and (y in (r0 * scale, r1 * scale - 1) or x in (c0 * scale, c1 * scale - 1)))
                    line += bytes((0, 160, 0) if on_box else px)
            rows.append(bytes(line))
    return rows


# --- main ---------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="integrated_gradients.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny training and fewer steps: a few seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=8, help="each image pixel becomes scale x scale PNG pixels")
    p.add_argument("--n-steps", type=int, default=None, help="integration steps (default 64, 32 with --quick)")
    args = p.parse_args(argv)
    if args.scale < 1:
        p.error(f"--scale must be >= 1, got {args.scale}")
    if args.n_steps is not None and args.n_steps < 1:
        p.error(f"--n-steps must be >= 1, got {args.n_steps}")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_steps, n_steps, n_eval = (40, 32, 16) if args.quick else (400, 64, 64)
    if args.n_steps is not None:
        n_steps = args.n_steps

    t0 = time.perf_counter()
    model = make_model().to(device)
    loss = train(model, train_steps, 64, gen, device)
    x, y, boxes, decoys = make_images(n_eval, gen)
    x = x.to(device)
    with torch.no_grad():
        pred = model(x).argmax(1).cpu()
    acc = float((pred == y).float().mean())
    print(f"trained {train_steps} steps in {time.perf_counter() - t0:.1f} s: last loss {loss:.3f}, "
          f"held-out accuracy {acc:.0%} ({n_eval} images)")

    # Attribute each held-out image's predicted class, from a black image, with fastml.
    t0 = time.perf_counter()
    attr, delta = fastml.integrated_gradients(model, x, baselines=0.0, target=pred.to(device), n_steps=n_steps,
                                              return_convergence_delta=True)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        logits_x = model(x).gather(1, pred.to(device)[:, None])[:, 0]
        logits_0 = model(torch.zeros_like(x)).gather(1, pred.to(device)[:, None])[:, 0]
    attr, delta = attr.cpu(), delta.cpu()
    gap = (logits_x - logits_0).cpu().double()
    rel = delta.double().abs() / gap.abs().clamp(min=1e-12)
    print(f"integrated gradients: {n_eval} images x {n_steps} steps in {seconds:.2f} s")

    i = 0  # the example that is shown
    total = float(attr[i].double().sum())
    print(f"example 0: true {CLASSES[y[i]]}, predicted {CLASSES[pred[i]]}")
    print(f"  sum of attributions {total:+.5f}, F(x) - F(baseline) {float(gap[i]):+.5f}")
    print(f"completeness error: {float(delta[i].abs()):.2e} (relative {float(rel[i]):.2e}); "
          f"worst over the {n_eval} images: relative {float(rel.max()):.2e}")
    share, decoy_share = box_share(attr, boxes), box_share(attr, decoys)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (SIZE * SIZE)
    print(f"positive attribution inside the bright square's box: {float(share[i]):.0%} for example 0 "
          f"(the box is {float(area[i]):.0%} of the image), in the decoy's box {float(decoy_share[i]):.0%}")
    r0, c0, r1, c1 = decoys[i].tolist()
    print(f"  attribution summed over the decoy's box: {float(attr[i, 0, r0:r1, c0:c1].sum()):+.3f}")
    print(f"  mean over {n_eval} images: bright square {float(share.mean()):.0%}, decoy "
          f"{float(decoy_share.mean()):.0%}, boxes' mean area {float(area.mean()):.0%}")

    write_png(args.out, picture(x[i, 0].cpu(), attr[i, 0], boxes[i], args.scale))
    print(f"wrote {args.out} ({(2 * SIZE + 1) * args.scale}x{SIZE * args.scale}): input left, attribution right")


if __name__ == "__main__":
    main()
