"""Long-tail classification with logit adjustment: plain cross-entropy, post-hoc adjustment, adjusted loss.

A synthetic long-tailed problem: Gaussian classes whose training counts fall geometrically from the first class
to the last (imbalance ratio 100 by default), and a balanced test set. A classifier trained with plain
cross-entropy learns the training prior and favours the head classes, so the tail classes' recall suffers.
Logit adjustment removes that prior: either after training (predict with logits - tau * log prior,
fastml.adjust_logits) or during training (fastml.logit_adjusted_cross_entropy, the loss on
logits + tau * log prior, whose logits then need no correction). The balanced accuracy (the mean of the per-class
recalls) of the three is printed, the comparison of Menon et al.'s long-tail paper in miniature.

    python examples/long_tail.py [--quick] [--classes 10] [--ratio 100] [--seed 0]
"""
import argparse
import time

import torch

import fastml


def make_data(classes, dim, ratio, n_max, n_test, gen):
    means = torch.randn(classes, dim, generator=gen) * 1.2
    counts = [max(2, int(round(n_max * ratio ** (-c / (classes - 1))))) for c in range(classes)]
    xs, ys = [], []
    for c, n in enumerate(counts):
        xs.append(means[c] + torch.randn(n, dim, generator=gen))
        ys.append(torch.full((n,), c))
    x_test = means.repeat_interleave(n_test, 0) + torch.randn(classes * n_test, dim, generator=gen)
    y_test = torch.arange(classes).repeat_interleave(n_test)
    return torch.cat(xs), torch.cat(ys), x_test, y_test, torch.tensor(counts)


def balanced_accuracy(logits, y, classes):
    pred = logits.argmax(-1)
    recalls = [(pred[y == c] == c).float().mean() for c in range(classes)]
    return 100 * torch.stack(recalls).mean().item()


def train(x, y, classes, *, counts=None, epochs, gen, hidden=64):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = fastml.nn.LogitAdjustedCrossEntropyLoss(class_counts=counts)  # counts None: plain cross-entropy
    n = x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 256):
            idx = perm[i:i + 256]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs (a few seconds)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=100.0, help="training count of the first class / the last")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    x, y, x_test, y_test, counts = make_data(args.classes, args.dim, args.ratio, 2000, 500, gen)
    epochs = 8 if args.quick else 30
    print(f"{args.classes} Gaussian classes in {args.dim} dims, training counts {counts.tolist()} "
          f"(imbalance ratio {args.ratio:g}), balanced test set of {x_test.shape[0]}")
    t0 = time.perf_counter()
    plain = train(x, y, args.classes, epochs=epochs, gen=gen)
    adjusted = train(x, y, args.classes, counts=counts, epochs=epochs, gen=gen)
    with torch.no_grad():
        logits_plain = plain(x_test)
        results = {
            "plain cross-entropy": logits_plain,
            "post-hoc adjustment": fastml.adjust_logits(logits_plain, class_counts=counts, tau=1.0),
            "logit-adjusted loss": adjusted(x_test),
        }
    for name, logits in results.items():
        print(f"{name}: balanced accuracy {balanced_accuracy(logits, y_test, args.classes):.1f}%")
    print(f"trained two models in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
