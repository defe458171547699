"""A language model that can't stop, and two cures (Welleck et al., "Consistency of a recurrent language model with
respect to incomplete decoding", ICML 2020).

The toy corpus is a Markov chain over 20 content tokens in two groups. From a token of group A the sequence ends
(eos) with probability 0.5, else moves on within A; from a token of group B it ends with probability only 0.1 and
otherwise moves to the next token of B (0.6) or the one after (0.3). Every sequence ends (lengths are geometric),
yet a model that learns these probabilities well cannot stop under the usual decoders when it is in group B:

- greedy decoding picks the 0.6 token at every step, never eos (0.1);
- top-k sampling with k = 2 (or nucleus sampling with p = 0.9) keeps the 0.6 and 0.3 tokens and removes eos, so
  eos has probability zero at every step: the sequence runs until the length limit, whatever the seed.

Cure 1, consistent sampling: the filtered set always keeps eos (fastml.sample(..., keep_ids=[eos])). This makes
eos possible at every step, so a sampled sequence ends with probability 1; it does not bound the length (a run of
non-eos draws of any length has positive probability) and it does nothing for greedy decoding.
Cure 2, the self-terminating model: the head is trained with fastml.self_terminating_nll, whose model gives
p_t(eos) >= 1 - (1 - eps)^t. Greedy decoding then must pick eos once p_t(eos) > 1/2, by step
ceil(log(1/2) / log(1 - eps)) at the latest, and sampling ends by any horizon with overwhelming probability.

Two LSTM language models of the same size are trained on the corpus (one with plain cross-entropy, one with the
self-terminating loss), and then each decoder runs on prompts from both groups with a generous length limit,
printing the share of sequences that produced eos. `--quick` trains briefly (for the test suite).
"""
import argparse
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastml  # noqa: E402

EOS, N_CONTENT = 0, 20
BOS = N_CONTENT + 1
VOCAB = N_CONTENT + 2
GROUP_A = list(range(1, 11))
GROUP_B = list(range(11, 21))
HAZARD = {"A": 0.5, "B": 0.1}
STEP_PROBS = (0.6, 0.3)  # next token of the group, the one after (scaled by 1 - hazard / 0.9 in group A)
MAX_TRAIN_LEN = 64
EPS = 0.01


def next_distribution(tok):
    """The corpus's true next-token distribution after content token `tok` (a [VOCAB] tensor)."""
    p = torch.zeros(VOCAB)
    group, name = (GROUP_A, "A") if tok in GROUP_A else (GROUP_B, "B")
    h = HAZARD[name]
    i = group.index(tok)
    p[EOS] = h
    rest = (1 - h) / sum(STEP_PROBS)
    p[group[(i + 1) % len(group)]] += STEP_PROBS[0] * rest
    p[group[(i + 2) % len(group)]] += STEP_PROBS[1] * rest
    return p


TABLE = torch.stack([next_distribution(t) if 1 <= t <= N_CONTENT else torch.zeros(VOCAB) for t in range(VOCAB)])


def corpus(n, gen):
    """n sequences [BOS, x_1, ..., x_L, EOS] with x_1 uniform over the content tokens, as a padded [n, T] tensor
    and the lengths (counting eos, without BOS); sequences longer than MAX_TRAIN_LEN are drawn again."""
    seqs = []
    while len(seqs) < n:
        s = [int(torch.randint(1, N_CONTENT + 1, (1,), generator=gen))]
        while s[-1] != EOS and len(s) <= MAX_TRAIN_LEN:
            s.append(int(torch.multinomial(TABLE[s[-1]], 1, generator=gen)))
        if s[-1] == EOS:
            seqs.append([BOS] + s)
    T = max(len(s) for s in seqs)
    data = torch.full((n, T), EOS, dtype=torch.long)
    for i, s in enumerate(seqs):
        data[i, :len(s)] = torch.tensor(s)
    return data, torch.tensor([len(s) - 1 for s in seqs])


class LSTMLM(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, x, state=None):
        h, state = self.lstm(self.emb(x), state)
        return self.head(h), state


def train(self_terminating, steps, gen, log_every):
    torch.manual_seed(0)
    model = LSTMLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, lengths = corpus(4096, gen)
    for step in range(steps):
        idx = torch.randint(0, data.shape[0], (128,), generator=gen)
        batch, lens = data[idx], lengths[idx]
        T = int(lens.max())
        inp, tgt = batch[:, :T], batch[:, 1:T + 1]
        mask = torch.arange(T) < lens[:, None]
        logits, _ = model(inp)
        if self_terminating:
            loss = fastml.self_terminating_nll(logits, tgt, EOS, eps=EPS, mask=mask)
        else:
            loss = F.cross_entropy(logits[mask], tgt[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}: loss {loss.item():.3f}")
    return model


@torch.no_grad()
def decode(model, prompts, *, mode, self_terminating, max_new, gen):
    """Generates up to max_new tokens after each prompt; returns (ended [N] bool, lengths [N]).

    mode: "greedy", "top-k" (k = 2), "top-k + eos" (k = 2, eos kept: consistent sampling)."""
    N = prompts.shape[0]
    logits, state = model(prompts)
    step_logits = logits[:, -1]
    ended = torch.zeros(N, dtype=torch.bool)
    lengths = torch.full((N,), max_new)
    log_alpha = None
    for t in range(max_new):
        if self_terminating:
            # The self-terminating model's log-probabilities; log_alpha carries its state from step to step.
            scores, log_alpha = fastml.self_terminating_log_softmax(step_logits, EOS, eps=EPS,
                                                                    log_alpha_prev=log_alpha)
        else:
            scores = step_logits
        if mode == "greedy":
            tok = fastml.sample(scores, temperature=0.0)
        elif mode == "top-k":
            tok = fastml.sample(scores, top_k=2, generator=gen)
        else:
            tok = fastml.sample(scores, top_k=2, keep_ids=[EOS], generator=gen)
        newly = (tok == EOS) & ~ended
        lengths[newly] = t + 1
        ended |= newly
        if bool(ended.all()):
            break
        logits, state = model(tok.unsqueeze(1), state)
        step_logits = logits[:, -1]
    return ended, lengths


def prompts_for(group, n, gen):
    """[BOS, x_1, x_2]: a two-token prefix of the chain that stays in `group` (x_2 not eos)."""
    toks = group[:]
    out = []
    while len(out) < n:
        a = toks[int(torch.randint(0, len(toks), (1,), generator=gen))]
        p = TABLE[a].clone()
        p[EOS] = 0
        b = int(torch.multinomial(p, 1, generator=gen))
        out.append([BOS, a, b])
    return torch.tensor(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short training (for the tests)")
    ap.add_argument("--max-new", type=int, default=200, help="length limit of the decoders")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    steps = 150 if args.quick else 400
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    print(f"training two LSTM LMs ({steps} steps each): plain cross-entropy, self-terminating (eps={EPS})")
    plain = train(False, steps, gen, 0 if args.quick else 100)
    st = train(True, steps, gen, 0 if args.quick else 100)
    print(f"trained in {time.time() - t0:.0f} s")
    n = 100 if args.quick else 500
    prompts = torch.cat([prompts_for(GROUP_A, n, gen), prompts_for(GROUP_B, n, gen)])
    bound = math.ceil(math.log(0.5) / math.log1p(-EPS))
    print(f"{2 * n} prompts (half from each group), at most {args.max_new} new tokens; the self-terminating "
          f"bound makes greedy stop by step {bound}")
    print()
    print(f"{'model':18s} {'decoder':28s} {'ended':>7s} {'group A':>8s} {'group B':>8s} {'mean len':>9s}")
    for name, model, st_head in (("plain", plain, False), ("self-terminating", st, True)):
        for mode, label in (("greedy", "greedy"), ("top-k", "top-k=2 sampling"),
                            ("top-k + eos", "top-k=2 + eos (consistent)")):
            ended, lengths = decode(model, prompts, mode=mode, self_terminating=st_head, max_new=args.max_new,
                                    gen=gen)
            share = 100 * ended.float().mean().item()
            a, b = (100 * ended[s].float().mean().item() for s in (slice(0, n), slice(n, None)))
            mean_len = lengths[ended].float().mean().item() if bool(ended.any()) else float("nan")
            print(f"{name:18s} {label:28s} {share:6.1f}% {a:7.1f}% {b:7.1f}% {mean_len:9.1f}")
    print()
    print("Consistent sampling keeps eos possible at every step, so sampled sequences end (with probability 1, not "
          "by a fixed length); greedy decoding is unaffected by it. The self-terminating head ends every "
          f"sequence: greedy by step {bound} at the latest, whatever the prompt.")


if __name__ == "__main__":
    main()
