"""A character-level language model built on fastml.nn.CausalLinearAttention, trained for about a minute.

It shows the two ways of running a linear-attention model: the parallel form (the whole sequence at once, used for
training and for prefilling a prompt) and the recurrent form (one token at a time from a fixed-size state, used for
generation). The script

  - reads text that ships with Python: the standard library's .py sources (a deterministic choice of files, a few
    hundred KB), split into a training part and a held-out part,
  - prints the held-out loss in bits per character before and after training,
  - checks that decoding token by token gives the same logits as the parallel forward over the same prefix,
  - prefills a prompt with forward(..., return_state=True) and generates ~200 characters with `step`, sampling
    with a temperature.

Linear attention has no notion of position by itself, so the model also adds the embeddings of the two previous
characters to each character's embedding (a short causal window, carried along while decoding).

Run (from the repository root, after `make test` has built .venv):

    .venv/bin/python examples/linear_attention_lm.py                  # about a minute of training (--seconds)
    .venv/bin/python examples/linear_attention_lm.py --quick          # a few seconds
    .venv/bin/python examples/linear_attention_lm.py --seconds 300 --prompt "def " --temperature 0.7

The model is small: on a machine that other jobs keep busy, one thread per process (OMP_NUM_THREADS=1)
is often faster than torch's default.
"""
import argparse
import math
import os
import time

import torch
from torch import nn

import fastml

VOCAB = 128          # ASCII; other characters are read as "?"
PAD = VOCAB          # embedding index for "no character" (before the start of the text)
WINDOW = 3           # the character itself and the two before it


# --- data -------------------------------------------------------------------------------------------------------

def stdlib_text(max_chars):
    """The first max_chars characters of the standard library's top-level .py files, in sorted file order."""
    root = os.path.dirname(os.__file__)
    parts, total = [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py") or name.startswith("_"):
            continue
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def encode(text):
    return torch.tensor([c if c < VOCAB else ord("?") for c in text.encode("ascii", errors="replace")],
                        dtype=torch.long)


def decode(tokens):
    return "".join(chr(t) for t in tokens)


# --- model ------------------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = fastml.nn.CausalLinearAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, state=None):
        a, state = self.attn(self.norm1(x), state=state, return_state=True)
        x = x + a
        return x + self.mlp(self.norm2(x)), state

    def step(self, x_t, state):
        a, state = self.attn.step(self.norm1(x_t), state)
        x_t = x_t + a
        return x_t + self.mlp(self.norm2(x_t)), state


class CharLM(nn.Module):
    """Embeddings of a character and of the WINDOW - 1 before it, linear-attention blocks, a linear read-out.

    forward(tokens [B, T], cache=None) -> (logits [B, T, VOCAB], cache); step(token [B], cache) -> (logits [B,
    VOCAB], cache). The cache holds the last WINDOW - 1 characters and each block's LinearAttentionState, so
    forward over a prompt followed by step per token computes the same logits as forward over the whole text.
    """

    def __init__(self, dim=128, heads=4, layers=2):
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(VOCAB + 1, dim) for _ in range(WINDOW))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def _embed(self, tokens, history):
        # tokens [B, T]; history [B, WINDOW - 1], the characters just before tokens (PAD before the start).
        seq = torch.cat([history, tokens], 1)
        T = tokens.shape[1]
        x = sum(emb(seq[:, WINDOW - 1 - j: WINDOW - 1 - j + T]) for j, emb in enumerate(self.embeds))
        return x, seq[:, -(WINDOW - 1):]

    def forward(self, tokens, cache=None):
        if cache is None:
            history = tokens.new_full((tokens.shape[0], WINDOW - 1), PAD)
            states = [None] * len(self.blocks)
        else:
            history, states = cache
        x, history = self._embed(tokens, history)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block(x, state)
            new_states.append(state)
        return self.head(self.norm(x)), (history, new_states)

    def step(self, token, cache):
        history, states = cache
        x, history = self._embed(token[:, None], history)
        x = x[:, 0]
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block.step(x, state)
            new_states.append(state)
        return self.head(self.norm(x)), (history, new_states)


# --- training and evaluation ------------------------------------------------------------------------------------

def batches(data, batch, length, generator):
    while True:
        start = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
        idx = start[:, None] + torch.arange(length + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def held_out_bpc(model, data, windows, length, device):
    """Mean loss in bits per character over `windows` evenly spaced windows of the held-out text."""
    model.eval()
    starts = torch.linspace(0, len(data) - length - 1, windows).long()
    idx = starts[:, None] + torch.arange(length + 1)
    chunk = data[idx].to(device)
    logits, _ = model(chunk[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
    model.train()
    return float(loss) / math.log(2)


def train(model, data, *, seconds, steps, batch, length, lr, generator, device):
    """Train for `steps` steps if given, else for `seconds` of wall time. Returns the number of steps taken."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = 20
    start = time.perf_counter()
    done = 0
    for x, y in batches(data, batch, length, generator):
        if steps is not None and done >= steps:
            break
        if steps is None and time.perf_counter() - start >= seconds:
            break
        # Linear warm-up, then a linear decay to a tenth over the run (measured in steps, or in seconds).
        progress = done / steps if steps is not None else (time.perf_counter() - start) / seconds
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (done + 1) / warmup) * (1.0 - 0.9 * min(progress, 1.0))
        logits, _ = model(x.to(device))
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.to(device).reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done += 1
    return done


# --- decoding ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def decode_check(model, tokens, prefill):
    """Largest |logit| difference between the parallel forward over `tokens` [1, T] and a prefill of the first
    `prefill` tokens followed by one step per remaining token."""
    model.eval()
    full, _ = model(tokens)
    logits, cache = model(tokens[:, :prefill])
    stepped = [logits]
    for t in range(prefill, tokens.shape[1]):
        out, cache = model.step(tokens[:, t], cache)
        stepped.append(out[:, None])
    return float((torch.cat(stepped, 1) - full).abs().max())


@torch.no_grad()
def generate(model, prompt, n_chars, temperature, generator, device):
    model.eval()
    tokens = encode(prompt)[None].to(device)
    logits, cache = model(tokens)
    logits = logits[:, -1]
    out = []
    for _ in range(n_chars):
        probs = torch.softmax(logits.float() / temperature, -1).cpu()
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        out.append(int(token))
        logits, cache = model.step(token.to(device), cache)
    return decode(out)


# --- main ---------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small model trained for 30 steps: a few seconds")
    p.add_argument("--seconds", type=float, default=60.0, help="training time (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of --seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="    def __init__(self")
    p.add_argument("--chars", type=int, default=200, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    args = p.parse_args(argv)
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    if not args.prompt:
        p.error("--prompt must not be empty")
    if args.seconds <= 0:
        p.error(f"--seconds must be > 0, got {args.seconds}")
    if args.steps is not None and args.steps < 0:
        p.error(f"--steps must be >= 0, got {args.steps}")
    if args.chars < 0:
        p.error(f"--chars must be >= 0, got {args.chars}")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.quick:
        text_chars, dim, layers, batch, length, windows = 100_000, 64, 1, 16, 64, 8
        steps = 30 if args.steps is None else args.steps
    else:
        text_chars, dim, layers, batch, length, windows = 400_000, 128, 2, 32, 128, 32
        steps = args.steps
    data = encode(stdlib_text(text_chars))
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    print(f"text: {len(data):,} characters of the standard library's sources "
          f"({len(train_data):,} to train on, {len(val_data):,} held out)")

    model = CharLM(dim=dim, layers=layers).to(device)
    print(f"model: {layers} linear-attention block(s), width {dim}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, on {device}")
    before = held_out_bpc(model, val_data, windows, length, device)
    print(f"held-out loss before training: {before:.3f} bits/char")
    t0 = time.perf_counter()
    done = train(model, train_data, seconds=args.seconds, steps=steps, batch=batch, length=length, lr=3e-3,
                 generator=gen, device=device)
    took = time.perf_counter() - t0
    after = held_out_bpc(model, val_data, windows, length, device)
    print(f"trained {done} steps ({done * batch * length:,} characters) in {took:.1f} s")
    print(f"held-out loss after training: {after:.3f} bits/char")

    err = decode_check(model, val_data[None, :96].to(device), prefill=32)
    ok = err <= 1e-3
    print(f"decode check: max |step logits - forward logits| = {err:.2e} over 64 steps "
          f"({'ok' if ok else 'MISMATCH'})")
    if not ok:
        raise SystemExit("the one-token decode path disagrees with the parallel forward")

    sample = generate(model, args.prompt, args.chars, args.temperature, gen, device)
    print(f"generated (prompt {args.prompt!r}, temperature {args.temperature}):")
    print("-" * 60)
    print(args.prompt + sample)
    print("-" * 60)


if __name__ == "__main__":
    main()
