"""fastml.probe: probing a BERT-like encoder without training, by Perturbed Masking (Wu et al., ACL 2020).

- `impact_matrix`: F[i, j] = d(H(x \\ {i})_i, H(x \\ {i, j})_i), how much masking word j changes the encoder's
  view of word i (already masked); `neighbour_impacts`, its cheap variant over adjacent tokens; `segment`, word
  boundaries from either.
- `eisner` (projective dependency trees) and `mart` (top-down binary constituency trees) decode trees from
  impact matrices (fastml.ops.trees).
- `parse(encoder, tokenizer, words)`: both trees of one sentence; `load_encoder(path)`: a Hugging Face encoder and
  its tokenizer.

Hugging Face `transformers` is optional: fastml never imports it; `load_encoder` does, and says how to install it
(`pip install fastml[probe]`) when it is missing. The maths and decisions are in
fastml/ops/perturbed_masking/README.md.
"""
from typing import NamedTuple

import torch

from fastml.ops.perturbed_masking import impact_matrix, neighbour_impacts, segment

__all__ = ["Parse", "impact_matrix", "load_encoder", "neighbour_impacts", "parse", "segment"]

try:
    from fastml.ops.trees import eisner, mart
except ImportError:  # the tree decoders are not in this build
    eisner = mart = None
else:
    __all__ += ["eisner", "mart"]


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("fastml.probe needs Hugging Face transformers to load an encoder: "
                          "pip install fastml[probe]") from exc
    return transformers


def load_encoder(path, *, device="cpu"):
    """(encoder, tokenizer) from a Hugging Face model folder or name: AutoModel and AutoTokenizer, the encoder in
    evaluation mode on `device`. Nothing is downloaded when HF_HUB_OFFLINE=1 is set."""
    tf = _transformers()
    model = tf.AutoModel.from_pretrained(str(path)).to(device).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


class Parse(NamedTuple):
    """The trees of one sentence.

    words: the input words; heads: per word its head as in CoNLL (0 the root, k the k-th word, 1-based);
    tree: nested 2-tuples of word indices (0-based; a single word is its int); impact: the [n, n] impact matrix
    over the words; arc_scores: the [n + 1, n + 1] arc scores the heads were decoded from (index 0 the root)."""

    words: list
    heads: list
    tree: object
    impact: torch.Tensor
    arc_scores: torch.Tensor

    def bracketed(self):
        """The tree as a bracketed string of the words, e.g. "((the cat) sat)"."""
        def show(t):
            return self.words[t] if isinstance(t, int) else f"({show(t[0])} {show(t[1])})"
        return show(self.tree)


def _word_spans(encoding, n):
    """Token spans of the n words from a fast tokenizer's word_ids()."""
    word_ids = encoding.word_ids(0)
    first, last = {}, {}
    for t, w in enumerate(word_ids):
        if w is None:
            continue
        first.setdefault(w, t)
        last[w] = t
    spans = []
    for w in range(n):
        if w not in first:
            raise ValueError(f"word {w} has no token (the tokenizer dropped it); remove it or its blank characters")
        if any(word_ids[t] != w for t in range(first[w], last[w] + 1)):
            raise ValueError(f"the tokens of word {w} are not contiguous")
        spans.append((first[w], last[w] + 1))
    return spans


def parse(encoder, tokenizer, words, *, layer=-1, metric="euclidean", mask_token_id=None, batch_size=None,
          backend="auto"):
    """Dependency heads and a binary constituency tree of one sentence, read from the encoder by Perturbed Masking.

    words: the sentence as a list of strings. The tokenizer (a Hugging Face fast tokenizer) splits them into
    tokens, special tokens included as context (never masked); a word's tokens are masked together and its vector
    is their mean. F = impact_matrix(..., layer, metric) over the words. Heads: `eisner` on arc scores
    S[h, d] = F[d, h] (the impact of the head on the dependent) with every arc from the root scoring 0: the root is
    not a word the encoder sees, so the word-to-word impacts alone decide the tree. Tree: `mart` on F.
    mask_token_id defaults to tokenizer.mask_token_id."""
    if eisner is None or mart is None:
        raise ImportError("fastml.probe.parse needs the tree decoders of fastml.ops.trees, which this build lacks")
    if not isinstance(words, (list, tuple)) or not words or not all(isinstance(w, str) and w for w in words):
        raise ValueError("words must be a non-empty list of non-empty strings")
    if mask_token_id is None:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError("the tokenizer has no mask token; pass mask_token_id")
    encoding = tokenizer(list(words), is_split_into_words=True, return_tensors="pt")
    if not hasattr(encoding, "word_ids") or not callable(encoding.word_ids):
        raise TypeError("parse needs a fast tokenizer (one whose encodings have word_ids())")
    spans = _word_spans(encoding, len(words))
    ids = encoding["input_ids"][0]
    if isinstance(encoder, torch.nn.Module):
        param = next(encoder.parameters(), None)
        if param is not None:
            ids = ids.to(param.device)
    F = impact_matrix(encoder, ids, mask_token_id=mask_token_id, word_spans=spans, layer=layer, metric=metric,
                      batch_size=batch_size, backend=backend).cpu()
    n = len(words)
    arcs = F.new_zeros(n + 1, n + 1)
    arcs[1:, 1:] = F.t()
    heads = eisner(arcs)
    return Parse(list(words), [int(h) for h in heads[1:].tolist()], mart(F), F, arcs)
