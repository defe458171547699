"""Training a small linear-attention language model on one sequence split over several processes.

Each process (rank) holds a contiguous slice of every training sequence, in rank order. The attention layers are
fastml.nn.CausalLinearAttention(..., sequence_parallel_group=group): the ranks exchange only the fixed-size
recurrent states, so each rank's activations cover T / world_size tokens, whatever T is. Everything else in the
model works token by token, so it runs on the slice as it is. Each rank's loss is the sum of its tokens' losses
divided by the number of tokens in the whole batch, so that the ranks' losses add up to the mean over the batch;
after the backward the ranks sum their parameter gradients (one all_reduce, as DistributedDataParallel would do)
and take the same optimizer step, so the replicas stay identical.

Run on one machine with 2 processes (from the repository root, after `make test` has built .venv):

    .venv/bin/torchrun --standalone --nproc_per_node 2 examples/sequence_parallel.py
    .venv/bin/torchrun --standalone --nproc_per_node 2 examples/sequence_parallel.py --quick --check

`--check` trains, on rank 0, a second copy of the model in one process on the whole sequences, in float64, and
prints how far the split run's losses and parameters are from it. On several machines, see
fastml/distributed/README.md ("Running on several machines"). On CPU the ranks talk over gloo, on GPUs over NCCL
(one GPU per process, LOCAL_RANK picks it).
"""
import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import fastml  # noqa: F401  (fastml.nn below)
from fastml.nn import CausalLinearAttention

VOCAB = 128


def stdlib_text(max_chars):
    """Text that ships with Python: the standard library's top-level .py files, in sorted order."""
    root = os.path.dirname(os.__file__)
    parts, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and not name.startswith("_"):
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
            total += len(parts[-1])
            if total >= max_chars:
                break
    data = "".join(parts)[:max_chars].encode("ascii", errors="replace")
    return torch.tensor([c if c < VOCAB else ord("?") for c in data], dtype=torch.long)


class Block(nn.Module):
    def __init__(self, dim, heads, group, dtype):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, dtype=dtype)
        self.attn = CausalLinearAttention(dim, heads, dtype=dtype, sequence_parallel_group=group)
        self.norm2 = nn.LayerNorm(dim, dtype=dtype)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, dtype=dtype), nn.GELU(), nn.Linear(4 * dim, dim, dtype=dtype))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    """Character embeddings (plus the previous character's, a one-token causal window: linear attention has no
    positions of its own), a few blocks, and a linear head."""

    def __init__(self, dim, heads, layers, group=None, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB + 1, dim, dtype=dtype)
        self.prev = nn.Embedding(VOCAB + 1, dim, dtype=dtype)
        self.blocks = nn.ModuleList(Block(dim, heads, group, dtype) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, dtype=dtype)
        self.head = nn.Linear(dim, VOCAB, dtype=dtype)

    def forward(self, tokens, previous):
        """tokens [B, T] and, for each, the character before it ([B, T]; VOCAB before the start)."""
        x = self.embed(tokens) + self.prev(previous)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batches(text, batch, length, steps, seed):
    """`steps` batches of `batch` windows of length + 1 characters (inputs and next-character targets)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(1, len(text) - length - 1, (batch,), generator=g)
        yield torch.stack([text[s - 1:s + length + 1] for s in starts.tolist()])  # one character of history


def loss_on(model, window, lo, hi, total_tokens):
    """Sum of the cross-entropies of positions [lo, hi) of the windows, divided by the whole batch's token count."""
    tokens, previous, targets = window[:, 1 + lo:1 + hi], window[:, lo:hi], window[:, 2 + lo:2 + hi]
    logits = model(tokens, previous)
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1),
                                       reduction="sum") / total_tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps: seconds")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence (all ranks together)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--check", action="store_true",
                   help="also train a copy on rank 0 in one process (float64 everywhere) and compare")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    length = args.length or (256 if args.quick else 4096)
    steps = args.steps or (8 if args.quick else 30)
    dim, heads, layers = (32, 2, 1) if args.quick else (128, 4, 2)
    dtype = torch.float64 if args.check else torch.float32

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    # A group of its own for the sequence-parallel exchanges keeps them apart from the gradient all_reduce.
    seq_group = dist.new_group(list(range(world)))
    # This rank's slice of every sequence: contiguous, in rank order (the first ranks get one more if uneven).
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + length // world + (r < length % world))
    lo, hi = bounds[rank], bounds[rank + 1]

    torch.manual_seed(args.seed)
    model = Model(dim, heads, layers, seq_group, dtype).to(device)
    reference = None
    if args.check and rank == 0:
        reference = Model(dim, heads, layers, None, dtype).to(device)
        reference.load_state_dict(model.state_dict())
        ref_opt = torch.optim.Adam(reference.parameters(), lr=3e-3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    text = stdlib_text(200_000)
    tokens_per_batch = args.batch * length

    if rank == 0:
        print(f"{world} ranks, sequences of {length} tokens ({hi - lo} on rank 0), batch {args.batch}, "
              f"model dim {dim}, {layers} layer(s), {steps} steps, {dtype}, on {device.type}")
    losses, ref_losses, worst = [], [], 0.0
    start = time.perf_counter()
    for window in batches(text, args.batch, length, steps, args.seed + 1):
        window = window.to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_on(model, window, lo, hi, tokens_per_batch)
        loss.backward()
        # One flat all_reduce of every gradient: the sum over ranks is the gradient of the batch mean.
        grads = [prm.grad for prm in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
        if reference is not None:
            ref_opt.zero_grad(set_to_none=True)
            ref_loss = loss_on(reference, window, 0, length, tokens_per_batch)
            ref_loss.backward()
            ref_opt.step()
            ref_losses.append(ref_loss.item())
            worst = max(worst, max((a - b).abs().max().item()
                                   for a, b in zip(model.parameters(), reference.parameters())))
    seconds = time.perf_counter() - start
    if rank == 0:
        print(f"loss (nats/char): first step {losses[0]:.4f}, last step {losses[-1]:.4f}")
        print(f"{steps} steps in {seconds:.1f} s")
        if reference is not None:
            gap = max(abs(a - b) for a, b in zip(losses, ref_losses))
            print(f"check against one process: max |loss difference| = {gap:.3e}, "
                  f"max |parameter difference| = {worst:.3e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
