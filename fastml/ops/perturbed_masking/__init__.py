"""Perturbed Masking (Wu et al., ACL 2020): impact matrices of a BERT-like encoder, computed without training.

The public functions live in `fastml.probe` (this package's `__all__` is empty, so nothing lands at fastml's top
level). What is here:

- the kernel op `perturbed_masking_distance` (gather of the needed word vectors from one batch of hidden states and
  their distance to the anchor vectors), with backends `reference` (reference.py), `cpp`
  (csrc/cpu/perturbed_masking.cpp) and `triton` (kernels/perturbed_masking.py), registered with fastml._backend;
- the engine that builds the masked sentences on the device, batches them, runs the encoder only up to the wanted
  layer and scatters the distances into the impact matrices (`impact_matrix`, `neighbour_impacts`);
- `segment`, the neighbour-mean rule that turns impacts into word boundaries.

README.md beside this file explains the maths and the decisions.
"""
import bisect
import contextlib
import sys

import torch

from fastml import _backend
from fastml._args import is_real
from fastml._numerics import acc_dtype
from fastml.ops.perturbed_masking import reference, schema  # noqa: F401  (schema declares the kernel op)
from fastml.ops.perturbed_masking.schema import METRICS

OP = "perturbed_masking_distance"
# Rows per encoder call when batch_size is None: about this many tokens (rows x length) per call.
DEFAULT_TOKENS_PER_BATCH = 4096
# Where BERT-like Hugging Face encoders keep their list of layers. Only the model types listed below run up to the
# requested layer with that list cut: their output after k layers is hidden state k (no norm after the list;
# checked against output_hidden_states for each). Others of the same layout (XLM-RoBERTa-XL, Megatron-BERT,
# RoBERTa-PreLayerNorm, CANINE) apply a final norm, so they run whole.
_LAYER_LISTS = (("encoder", "layer"), ("transformer", "layer"))
_CUTTABLE_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "ernie",
                             "data2vec-text", "roc_bert", "luke", "mobilebert", "yoso", "nystromformer", "splinter"})


# ---------------------------------------------------------------------------------------------------------------
# The distance op


def distance(states, rows, starts, ends, anchors, anchor_index, metric, backend="auto"):
    """dist[m] = d(anchors[anchor_index[m]], mean(states[rows[m], starts[m]:ends[m]])) through `backend`
    (semantics in schema.py)."""
    impl = _backend.select(OP, _backend.Call(states.device, states.dtype), backend).impl
    return impl(states, rows, starts, ends, anchors, anchor_index, metric)


def _reference_distance(states, rows, starts, ends, anchors, anchor_index, metric):
    schema.check_distance(states, rows, starts, ends, anchors, anchor_index, metric)
    return reference.distance(states, rows, starts, ends, anchors, anchor_index, metric)


def _register():
    ops = torch.ops.fastml
    _backend.register(OP, _backend.Backend("reference", _reference_distance))
    _backend.register(OP, _backend.Backend("cpp", ops.perturbed_masking_distance))
    _backend.register(OP, _backend.Backend("triton", ops.perturbed_masking_distance_triton))


_register()


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _check_ids(input_ids, attention_mask):
    """(ids [B, L] int64, lengths list[int], single) with the real lengths read from a right-padded mask."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.dim() not in (1, 2) or input_ids.shape[-1] < 1 or (input_ids.dim() == 2 and input_ids.shape[0] < 1):
        raise ValueError(f"input_ids must be [L] or [B, L] with L >= 1, got shape {list(input_ids.shape)}")
    single = input_ids.dim() == 1
    ids = input_ids.reshape(1, -1) if single else input_ids
    B, L = ids.shape
    if attention_mask is None:
        return ids.long(), [L] * B, single
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {list(input_ids.shape)}, got "
                         f"{list(attention_mask.shape)}")
    am = attention_mask.reshape(B, L)
    if am.dtype.is_floating_point or am.dtype.is_complex:
        raise TypeError(f"attention_mask must be an integer or bool tensor of 0/1, got dtype {am.dtype}")
    am = am.long()
    if bool(((am != 0) & (am != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    lengths = am.sum(1)
    if bool((am != (torch.arange(L, device=am.device)[None, :] < lengths[:, None]).long()).any()):
        raise ValueError("attention_mask must be right-padded: each row's ones first, then zeros")
    lengths = lengths.tolist()
    if min(lengths) < 1:
        raise ValueError("every sentence needs at least one real token (a row of attention_mask is all zeros)")
    return ids.long(), lengths, single


def _check_int(x, name):
    if not isinstance(x, int) or isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return x


def _check_spans(word_spans, lengths, single):
    """Per sentence a list of (start, end) half-open token spans, non-empty, inside the sentence, disjoint."""
    if word_spans is None:
        return [[(t, t + 1) for t in range(n)] for n in lengths]
    if not isinstance(word_spans, (list, tuple)):
        raise TypeError(f"word_spans must be a list of (start, end) spans (one list per sentence for [B, L] "
                        f"input_ids), got {type(word_spans).__name__}")
    per_sentence = [word_spans] if single else list(word_spans)
    if len(per_sentence) != len(lengths):
        raise ValueError(f"word_spans must hold one list of spans per sentence ({len(lengths)}), got "
                         f"{len(per_sentence)}")
    out = []
    for b, (spans, L) in enumerate(zip(per_sentence, lengths)):
        where = "word_spans" if single else f"word_spans[{b}]"
        if not isinstance(spans, (list, tuple)):
            raise TypeError(f"{where} must be a list of (start, end) spans, got {type(spans).__name__}")
        clean = []
        for k, span in enumerate(spans):
            if isinstance(span, torch.Tensor):
                span = span.tolist()
            if not isinstance(span, (list, tuple)) or len(span) != 2:
                raise ValueError(f"{where}[{k}] must be a (start, end) pair, got {span!r}")
            s, e = (_check_int(v, f"{where}[{k}]") for v in span)
            if not 0 <= s < e <= L:
                raise ValueError(f"{where}[{k}] = ({s}, {e}) must be a non-empty span inside the sentence's {L} "
                                 f"real tokens (0 <= start < end <= {L})")
            clean.append((s, e))
        order = sorted(range(len(clean)), key=lambda k: clean[k])
        for a, c in zip(order, order[1:]):
            if clean[c][0] < clean[a][1]:
                raise ValueError(f"{where}[{a}] = {clean[a]} and {where}[{c}] = {clean[c]} overlap")
        out.append(clean)
    return out


def _check_options(mask_token_id, layer, metric, batch_size):
    if mask_token_id is None:
        raise ValueError("mask_token_id is required (e.g. tokenizer.mask_token_id); got None")
    if (isinstance(mask_token_id, torch.Tensor) and mask_token_id.numel() == 1
            and not mask_token_id.dtype.is_floating_point):
        mask_token_id = int(mask_token_id)
    _check_int(mask_token_id, "mask_token_id")
    if mask_token_id < 0:
        raise ValueError(f"mask_token_id must be >= 0, got {mask_token_id}")
    _check_int(layer, "layer")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if batch_size is not None:
        _check_int(batch_size, "batch_size")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    return mask_token_id


def _check_encoder(encoder):
    if not callable(encoder):
        raise TypeError(f"encoder must be callable (a Hugging Face encoder or a function returning every layer's "
                        f"hidden states), got {type(encoder).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Running the encoder


def _is_hf(encoder):
    """A Hugging Face model. transformers is never imported here: a model of it implies it is loaded already."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(encoder, tf.PreTrainedModel)


def _layer_list(encoder):
    """(holder, attribute, ModuleList) of the layers of an encoder that may run cut (_CUTTABLE_TYPES), or None."""
    if getattr(getattr(encoder, "config", None), "model_type", None) not in _CUTTABLE_TYPES:
        return None
    base = getattr(encoder, "base_model", encoder)
    for outer, attr in _LAYER_LISTS:
        holder = getattr(base, outer, None)
        layers = getattr(holder, attr, None) if holder is not None else None
        if isinstance(layers, torch.nn.ModuleList):
            return holder, attr, layers
    return None


def _resolve(layer, count):
    """HF-style index into `count` hidden states -> non-negative index; IndexError when out of range."""
    if not -count <= layer < count:
        raise IndexError(f"layer {layer} is out of range: the encoder has {count} hidden states (embeddings and "
                         f"{count - 1} layers), so layer must lie in [{-count}, {count - 1}]")
    return layer % count


class _Runner:
    """Runs the encoder on a batch of rows and returns the states of the requested layer [R, T, D].

    Hugging Face encoders whose layers sit in `encoder.layer` / `transformer.layer` (BERT, RoBERTa, XLM-R, ELECTRA,
    DistilBERT, ...) run inside `prepared()` with that list cut to the first `layer` layers: their output after k
    layers is hidden state k, so the layers above are never computed. Other Hugging Face models run whole with
    output_hidden_states; a plain callable returns every layer's states (a tuple or list of [R, T, D] tensors, or
    an object with `.hidden_states`)."""

    def __init__(self, encoder, layer):
        self.encoder, self.layer = encoder, layer
        self.hf = _is_hf(encoder)
        self.index = None  # resolved index among the hidden states of the full model
        self.cut = None  # (holder, attr, full list, kept count) while truncated
        if self.hf:
            found = _layer_list(encoder)
            if found is not None:
                holder, attr, layers = found
                self.index = _resolve(layer, len(layers) + 1)
                if self.index < len(layers):
                    self.cut = (holder, attr, layers, self.index)
            else:
                count = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
                if isinstance(count, int):
                    self.index = _resolve(layer, count + 1)

    @contextlib.contextmanager
    def prepared(self):
        """Evaluation mode (dropout off) and, for a truncatable encoder, the shortened layer list; both are put
        back as they were when the block exits, whatever happens inside."""
        modes = [(m, m.training) for m in self.encoder.modules()] if isinstance(self.encoder, torch.nn.Module) else []
        for m, _ in modes:
            m.training = False
        if self.cut is not None:
            holder, attr, layers, keep = self.cut
            setattr(holder, attr, torch.nn.ModuleList(list(layers)[:keep]))
        try:
            yield
        finally:
            if self.cut is not None:
                holder, attr, layers, _ = self.cut
                setattr(holder, attr, layers)
            for m, mode in modes:
                m.training = mode

    def __call__(self, ids, am):
        if self.hf:
            if self.cut is not None:
                # The base model (a head on top, e.g. a masked-LM one, would only cost time): its last state.
                base = getattr(self.encoder, "base_model", self.encoder)
                return base(input_ids=ids, attention_mask=am, return_dict=True).last_hidden_state
            hidden = self.encoder(input_ids=ids, attention_mask=am, output_hidden_states=True,
                                  return_dict=True).hidden_states
        else:
            hidden = self.encoder(input_ids=ids, attention_mask=am)
            hidden = getattr(hidden, "hidden_states", hidden)
        if isinstance(hidden, torch.Tensor) or not isinstance(hidden, (list, tuple)) or not hidden:
            raise TypeError("the encoder must return the hidden states of every layer (a tuple or list of "
                            "[batch, tokens, dim] tensors, or an object with .hidden_states)")
        if self.index is None:
            self.index = _resolve(self.layer, len(hidden))
        elif self.index >= len(hidden):
            raise IndexError(f"layer {self.layer} is out of range for the {len(hidden)} hidden states returned")
        states = hidden[self.index]
        if not isinstance(states, torch.Tensor) or states.dim() != 3 or tuple(states.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"the encoder's hidden states must be [batch, tokens, dim] = [{ids.shape[0]}, "
                             f"{ids.shape[1]}, D], got "
                             f"{list(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__}")
        return states


# ---------------------------------------------------------------------------------------------------------------
# The engine


def _plan(lengths, spans, pairs, device):
    """Every distinct masked sentence and every distance to compute, as tensors built by broadcasting.

    A row is (sentence b, word i, word j) with i <= j: i == j masks word i alone, i < j masks both. Rows are
    ordered by sentence length (longest first; a batch holds rows of one length), and within a sentence its one-word rows
    before its two-word rows, so a row's anchors are pooled no later than the batch that needs them."""
    B = len(lengths)
    n = torch.tensor([len(s) for s in spans], device=device, dtype=torch.long)
    N = max(int(n.max()), 1)
    starts = torch.zeros(B, N, dtype=torch.long, device=device)
    ends = torch.ones(B, N, dtype=torch.long, device=device)
    flat = [(b, k, s, e) for b, ss in enumerate(spans) for k, (s, e) in enumerate(ss)]
    if flat:
        idx = torch.tensor(flat, dtype=torch.long, device=device)
        starts[idx[:, 0], idx[:, 1]] = idx[:, 2]
        ends[idx[:, 0], idx[:, 1]] = idx[:, 3]
    if pairs == "all":
        cand = torch.triu_indices(N, N, 0, device=device)  # [2, P]: i <= j
    else:  # adjacent words: (i, i) and (i, i + 1)
        ar = torch.arange(N, device=device)
        cand = torch.cat([torch.stack([ar, ar]), torch.stack([ar[:-1], ar[1:]])], 1)
    ci, cj = cand
    valid = cj[None, :] < n[:, None]  # [B, P]
    b_idx, p_idx = valid.nonzero(as_tuple=True)
    wi, wj = ci[p_idx], cj[p_idx]
    L = torch.tensor(lengths, device=device, dtype=torch.long)
    rank = torch.empty(B, dtype=torch.long, device=device)
    rank[torch.argsort(-L, stable=True)] = torch.arange(B, device=device)
    key = (rank[b_idx] * 2 + (wi != wj).long()) * (cand.shape[1] + 1) + p_idx
    order = torch.argsort(key)
    b_idx, wi, wj = b_idx[order], wi[order], wj[order]
    word_off = torch.cumsum(n, 0) - n
    mat_off = torch.cumsum(n * n, 0) - n * n
    # Outputs: every pair row gives f(i, j) from position i and f(j, i) from position j.
    pair = (wi != wj).nonzero(as_tuple=True)[0]
    pb, pi, pj = b_idx[pair], wi[pair], wj[pair]
    out_row = torch.stack([pair, pair], 1).reshape(-1)
    word = torch.stack([pi, pj], 1).reshape(-1)
    ob = torch.stack([pb, pb], 1).reshape(-1)
    other = torch.stack([pj, pi], 1).reshape(-1)
    plan = {
        "b": b_idx, "wi": wi, "wj": wj, "rowlen": L[b_idx],
        "starts": starts, "ends": ends, "n": n, "total_words": int(n.sum()), "total_cells": int((n * n).sum()),
        "mat_off": mat_off,
        "single": (wi == wj).nonzero(as_tuple=True)[0],
        "out_row": out_row, "out_start": starts[ob, word], "out_end": ends[ob, word],
        "out_anchor": word_off[ob] + word, "out_dest": mat_off[ob] + word * n[ob] + other,
    }
    plan["single_anchor"] = word_off[b_idx[plan["single"]]] + wi[plan["single"]]
    return plan


def _word_of_token(ids, spans):
    """[B, L] word index of every token (-1 outside every span)."""
    B, L = ids.shape
    wot = torch.full((B, L), -1, dtype=torch.long, device=ids.device)
    flat = [(b, t, k) for b, ss in enumerate(spans) for k, (s, e) in enumerate(ss) for t in range(s, e)]
    if flat:
        idx = torch.tensor(flat, dtype=torch.long, device=ids.device)
        wot[idx[:, 0], idx[:, 1]] = idx[:, 2]
    return wot


def _pool(states, starts, ends):
    """[M, D] means of states[m, starts[m]:ends[m]] (the anchors: one per one-word row)."""
    if bool(((ends - starts) == 1).all()):
        return states[torch.arange(states.shape[0], device=states.device), starts]
    pos = torch.arange(states.shape[1], device=states.device)
    w = ((pos[None, :] >= starts[:, None]) & (pos[None, :] < ends[:, None])).to(states.dtype)
    return torch.bmm(w[:, None, :], states).squeeze(1) / (ends - starts).to(states.dtype)[:, None]


def _batches(rowlen, batch_size):
    """[(r0, r1, T)] consecutive row ranges of at most batch_size rows (default: about DEFAULT_TOKENS_PER_BATCH
    tokens), each of rows of one length T: rows come longest sentence first, and a range ends where the length
    changes, so no call pads (an encoder runs a batch without padding on its unmasked attention, which is faster;
    on a 2-core CPU, MiniLM took about 14% longer on padded batches across sentences)."""
    lens = rowlen.tolist()
    shorter = [-n for n in lens]  # ascending
    out, r0, R = [], 0, len(lens)
    while r0 < R:
        T = lens[r0]
        size = batch_size or max(1, DEFAULT_TOKENS_PER_BATCH // T)
        r1 = min(r0 + size, bisect.bisect_right(shorter, -T, r0))
        out.append((r0, r1, T))
        r0 = r1
    return out


def impacts(encoder, input_ids, *, mask_token_id, attention_mask, word_spans, layer, metric, batch_size, backend,
            pairs):
    """The shared engine: returns (list of [n_b, n_b] impact matrices with the requested pairs filled, single)."""
    _check_encoder(encoder)
    ids, lengths, single = _check_ids(input_ids, attention_mask)
    spans = _check_spans(word_spans, lengths, single)
    mask_token_id = _check_options(mask_token_id, layer, metric, batch_size)
    _backend.check_name(backend)
    device = ids.device
    vocab = getattr(getattr(encoder, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and mask_token_id >= vocab:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the encoder's vocabulary of {vocab} tokens")
    runner = _Runner(encoder, layer)
    with torch.inference_mode():
        plan = _plan(lengths, spans, pairs, device)
        wot = _word_of_token(ids, spans)
        full_am = (torch.arange(ids.shape[1], device=device)[None, :]
                   < torch.tensor(lengths, device=device)[:, None]).long()
        batches = _batches(plan["rowlen"], batch_size)
        ends_t = torch.tensor([r1 for _, r1, _ in batches], dtype=torch.long, device=device)
        s_bounds = [0] + torch.searchsorted(plan["single"], ends_t).tolist()
        o_bounds = [0] + torch.searchsorted(plan["out_row"], ends_t).tolist()
        result = anchors = None
        with runner.prepared():
            for k, (r0, r1, T) in enumerate(batches):
                b = plan["b"][r0:r1]
                wi, wj = plan["wi"][r0:r1, None], plan["wj"][r0:r1, None]
                w = wot[b, :T]
                rows_ids = torch.where((w == wi) | (w == wj), mask_token_id, ids[b, :T])
                states = runner(rows_ids, full_am[b, :T]).contiguous()
                if result is None:
                    result = torch.zeros(plan["total_cells"], dtype=acc_dtype(states.dtype), device=device)
                    anchors = states.new_empty((plan["total_words"], states.shape[2]))
                # Anchors: word i's vector in the sentence with word i masked (rows of this batch masking one word).
                sl = slice(s_bounds[k], s_bounds[k + 1])
                if sl.stop > sl.start:
                    rows = plan["single"][sl]
                    bb, ii = plan["b"][rows], plan["wi"][rows]
                    anchors[plan["single_anchor"][sl]] = _pool(states[rows - r0], plan["starts"][bb, ii],
                                                               plan["ends"][bb, ii])
                # Impacts: word i's vector with words i and j masked, against its anchor, fused in the kernel.
                sl = slice(o_bounds[k], o_bounds[k + 1])
                if sl.stop > sl.start:
                    d = distance(states, plan["out_row"][sl] - r0, plan["out_start"][sl], plan["out_end"][sl],
                                 anchors, plan["out_anchor"][sl], metric, backend)
                    result[plan["out_dest"][sl]] = d
    if result is None:  # no word at all: nothing ran; the dtype an encoder's parameters would give
        params = encoder.parameters() if isinstance(encoder, torch.nn.Module) else iter(())
        result = torch.zeros(0, dtype=acc_dtype(next(params, torch.zeros(0)).dtype), device=device)
    result = result.clone()  # a normal tensor, usable outside inference mode
    mats, off = [], 0
    for ss in spans:
        k = len(ss)
        mats.append(result[off:off + k * k].view(k, k))
        off += k * k
    return mats, single


def impact_matrix(encoder, input_ids, *, mask_token_id, attention_mask=None, word_spans=None, layer=-1,
                  metric="euclidean", batch_size=None, backend="auto"):
    """Perturbed Masking's impact matrix: F[i, j] = d(H(x \\ {i})_i, H(x \\ {i, j})_i) (F[i, i] = 0).

    H is the encoder's hidden state at `layer` (Hugging Face indexing: 0 the embeddings, negative from the end),
    x \\ S the sentence with every token of the words in S replaced by `mask_token_id`, a word's vector the mean of
    its tokens' states, d the Euclidean distance (metric="euclidean") or 1 - cosine similarity ("cosine").

    input_ids [L] returns one [n, n] matrix; [B, L] (right-padded, with attention_mask [B, L]) returns a list of B
    matrices [n_b, n_b]. word_spans: the words as half-open token spans (start, end), per sentence for [B, L]
    input; tokens outside every span are context, never masked. None: every real token is a word (special tokens
    included). Results are in float32 (float64 for a float64 encoder).

    Each distinct masked sentence runs once: n with one word masked and n (n - 1) / 2 with two (the sentence with i
    and j masked gives F[i, j] at i and F[j, i] at j), built on the device and batched across words and sentences of
    similar length, `batch_size` rows per encoder call (None: about 4096 tokens). A BERT-like Hugging Face encoder
    runs only up to `layer` (its layer list is cut for the call and restored after); dropout is off during the
    call. `backend` picks the distance kernel ("auto", "reference", "cpp", "triton").
    """
    mats, single = impacts(encoder, input_ids, mask_token_id=mask_token_id, attention_mask=attention_mask,
                           word_spans=word_spans, layer=layer, metric=metric, batch_size=batch_size,
                           backend=backend, pairs="all")
    return mats[0] if single else mats


def neighbour_impacts(encoder, input_ids, *, mask_token_id, attention_mask=None, layer=-1, metric="euclidean",
                      batch_size=None, backend="auto"):
    """For each pair of adjacent tokens (b - 1, b): (F[b - 1, b] + F[b, b - 1]) / 2, with F the token-level impact
    matrix of `impact_matrix` (every real token a word). Needs 2 L - 1 masked sentences instead of L (L + 1) / 2.
    input_ids [L] returns [L - 1]; [B, L] with attention_mask returns a list of [L_b - 1] tensors."""
    mats, single = impacts(encoder, input_ids, mask_token_id=mask_token_id, attention_mask=attention_mask,
                           word_spans=None, layer=layer, metric=metric, batch_size=batch_size, backend=backend,
                           pairs="adjacent")
    out = [(m.diagonal(1) + m.diagonal(-1)) / 2 for m in mats]
    return out[0] if single else out


def segment(scores, *, threshold):
    """Word boundaries from impacts: a new word starts at token b (1 <= b < n) where the neighbour mean of
    (b - 1, b) is below `threshold`. scores: an [n, n] impact matrix or the [n - 1] neighbour means of
    `neighbour_impacts`. Returns those b in ascending order."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating tensor, got dtype {scores.dtype}")
    if scores.dim() == 2:
        if scores.shape[0] != scores.shape[1]:
            raise ValueError(f"scores must be a square [n, n] matrix or [n - 1] neighbour means, got shape "
                             f"{list(scores.shape)}")
        means = (scores.diagonal(1) + scores.diagonal(-1)) / 2
    elif scores.dim() == 1:
        means = scores
    else:
        raise ValueError(f"scores must be [n, n] or [n - 1], got shape {list(scores.shape)}")
    if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
        threshold = float(threshold)
    if not is_real(threshold):
        raise TypeError(f"threshold must be a real number, got {type(threshold).__name__}")
    return [int(k) + 1 for k in (means < float(threshold)).nonzero(as_tuple=True)[0].tolist()]


__all__ = []
