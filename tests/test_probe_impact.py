"""fastml.probe impact matrices (Perturbed Masking) against a straightforward implementation of the paper's loop (one
batch per word i, the full model, every hidden state asked for): single- and multi-token words, batches of
sentences of different lengths, both metrics, layers 0 / middle / last, Hugging Face encoders (BERT, RoBERTa,
DistilBERT, through the layer-list cut) and a plain callable; neighbour impacts; segment; the distance kernel on every
backend against its reference, with opcheck; bad inputs; inputs left as they were."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402

from fastml import probe  # noqa: E402
from fastml.ops.perturbed_masking import distance, reference  # noqa: E402
from fastml.testing import assert_close  # noqa: E402

transformers = pytest.importorskip("transformers")

MASK, VOCAB = 3, 40
F64 = torch.float64


def _bert(layers=3, dtype=F64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, initializer_range=0.3)
    return transformers.BertModel(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def bert():
    return _bert()


def _ids(L, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(MASK + 1, VOCAB, (L,), generator=g)


def _dist(a, v, metric):
    if metric == "euclidean":
        return torch.linalg.vector_norm(a - v, dim=-1)
    return 1 - Fn.cosine_similarity(a, v, dim=-1)


def paper_loop(encoder, ids, spans, layer, metric, hf=True):
    """The paper's loop, written plainly: for each word i one batch of n sentences (row j: words i and j masked; row
    i: word i alone), the whole model, every hidden state, and F[i, j] = d(word i in row i, word i in row j)."""
    n = len(spans)
    out = torch.zeros(n, n, dtype=F64)
    with torch.no_grad():
        for i, (si, ei) in enumerate(spans):
            x = ids.repeat(n, 1)
            x[:, si:ei] = MASK
            for j, (sj, ej) in enumerate(spans):
                x[j, sj:ej] = MASK
            am = torch.ones_like(x)
            if hf:
                hs = encoder(input_ids=x, attention_mask=am, output_hidden_states=True).hidden_states
            else:
                hs = encoder(input_ids=x, attention_mask=am)
            h = hs[layer][:, si:ei].mean(1).double()
            for j in range(n):
                if j != i:
                    out[i, j] = _dist(h[i], h[j], metric)
    return out


def _close(got, want, tight=True):
    assert got.shape == want.shape
    assert_close(got.double(), want, rtol=1e-7 if tight else 1e-4, atol=1e-10 if tight else 1e-6, name="impact")


# ---- impact_matrix against the paper's loop -----------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_single_token_words(bert, metric, layer):
    ids = _ids(9, 1)
    got = probe.impact_matrix(bert, ids, mask_token_id=MASK, layer=layer, metric=metric)
    want = paper_loop(bert, ids, [(t, t + 1) for t in range(9)], layer, metric)
    assert got.dtype == F64
    _close(got, want)
    assert torch.all(got.diagonal() == 0)
    if layer != 0:  # at the embeddings, masking another word cannot move word i: the zero matrix is right there
        assert float(got.abs().max()) > 1e-4, "the loop and fastml agree on a degenerate (zero) matrix"


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_multi_token_words(bert, metric):
    ids = _ids(12, 2)
    spans = [(1, 3), (3, 4), (4, 7), (8, 9), (9, 11)]  # tokens 0, 7 and 11 are context
    got = probe.impact_matrix(bert, ids, mask_token_id=MASK, word_spans=spans, layer=2, metric=metric)
    _close(got, paper_loop(bert, ids, spans, 2, metric))
    # Spans in another order index the matrix in that order.
    perm = [3, 0, 4, 1, 2]
    again = probe.impact_matrix(bert, ids, mask_token_id=MASK, word_spans=[spans[k] for k in perm], layer=2,
                                metric=metric)
    _close(again, got[perm][:, perm])


@pytest.mark.parametrize("batch_size", [None, 7])
def test_batched_sentences(bert, batch_size):
    lengths = [6, 11, 3, 9]
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    am = torch.zeros_like(ids)
    sents = []
    for b, n in enumerate(lengths):
        sents.append(_ids(n, 10 + b))
        ids[b, :n], am[b, :n] = sents[-1], 1
    spans = [[(0, 2), (2, 3), (3, 6)], None, [(1, 3)], [(0, 1), (2, 5), (5, 6), (6, 9)]]
    spans[1] = [(t, t + 1) for t in range(11)]
    got = probe.impact_matrix(bert, ids, mask_token_id=MASK, attention_mask=am, word_spans=spans,
                              batch_size=batch_size, metric="cosine")
    assert isinstance(got, list) and len(got) == len(lengths)
    for b in range(len(lengths)):
        # Padding and mixed batches change float summation order only: float64 keeps that below 1e-9.
        _close(got[b], paper_loop(bert, sents[b], spans[b], -1, "cosine"), tight=False)
    # Without spans every real token is a word.
    plain = probe.impact_matrix(bert, ids, mask_token_id=MASK, attention_mask=am, batch_size=batch_size)
    assert [m.shape[0] for m in plain] == lengths
    _close(plain[0], paper_loop(bert, sents[0], [(t, t + 1) for t in range(6)], -1, "euclidean"), tight=False)


def test_float32_encoder():
    model = _bert(dtype=torch.float32)
    ids = _ids(8, 3)
    got = probe.impact_matrix(model, ids, mask_token_id=MASK, batch_size=5)
    assert got.dtype == torch.float32
    _close(got, paper_loop(model, ids, [(t, t + 1) for t in range(8)], -1, "euclidean"), tight=False)


@pytest.mark.parametrize("arch", ["roberta", "distilbert"])
def test_other_hf_encoders(arch):
    torch.manual_seed(0)
    if arch == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=48, max_position_embeddings=70, initializer_range=0.3,
                                         pad_token_id=1)
        model = transformers.RobertaModel(cfg)
    else:
        cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=48,
                                            max_position_embeddings=64, initializer_range=0.3)
        model = transformers.DistilBertModel(cfg)
    model = model.double().eval()
    ids = _ids(7, 4)
    for layer in (1, -1):
        got = probe.impact_matrix(model, ids, mask_token_id=MASK, layer=layer)
        _close(got, paper_loop(model, ids, [(t, t + 1) for t in range(7)], layer, "euclidean"))


def test_layer_list_is_restored_and_mode_kept(bert):
    layers = list(bert.encoder.layer)
    bert.train()
    try:
        probe.impact_matrix(bert, _ids(4, 5), mask_token_id=MASK, layer=1)
        assert list(bert.encoder.layer) == layers and bert.training and bert.encoder.layer[0].training
        with pytest.raises(ValueError):  # an error inside the call restores them too
            probe.impact_matrix(bert, _ids(4, 5), mask_token_id=MASK, layer=1, word_spans=[(0, 9)])
        assert list(bert.encoder.layer) == layers
    finally:
        bert.eval()


class _Callable:
    """A plain (non Hugging Face) encoder: embeddings and two token-mixing layers, every layer's states returned."""

    def __init__(self):
        g = torch.Generator().manual_seed(7)
        self.emb = torch.randn(VOCAB, 16, generator=g, dtype=F64)
        self.w = [torch.randn(16, 16, generator=g, dtype=F64) * 0.4 for _ in range(2)]
        self.calls = 0

    def __call__(self, *, input_ids, attention_mask):
        self.calls += 1
        h = self.emb[input_ids]
        out = [h]
        m = attention_mask.to(F64)[..., None]
        for w in self.w:
            ctx = (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
            h = torch.tanh(h @ w + ctx)
            out.append(h)
        return tuple(out)


@pytest.mark.parametrize("layer", [1, -1])
def test_plain_callable(layer):
    enc = _Callable()
    ids = _ids(7, 6)
    spans = [(0, 2), (2, 3), (4, 7)]
    got = probe.impact_matrix(enc, ids, mask_token_id=MASK, word_spans=spans, layer=layer, metric="cosine")
    _close(got, paper_loop(enc, ids, spans, layer, "cosine", hf=False))
    with pytest.raises(IndexError, match="layer"):
        probe.impact_matrix(enc, ids, mask_token_id=MASK, layer=3)


def test_distinct_sentences_run_once():
    """n one-word and n (n - 1) / 2 two-word sentences, nothing more (counted through a plain callable)."""
    enc = _Callable()
    seen = []
    inner = enc.__call__

    def spy(*, input_ids, attention_mask):
        seen.append(input_ids.clone())
        return inner(input_ids=input_ids, attention_mask=attention_mask)

    n = 6
    probe.impact_matrix(spy, _ids(n, 8), mask_token_id=MASK, batch_size=4)
    rows = torch.cat(seen)
    assert rows.shape[0] == n * (n + 1) // 2
    assert len({tuple(r.tolist()) for r in rows}) == rows.shape[0]
    assert all(c <= 4 for c in (s.shape[0] for s in seen))


# ---- neighbour impacts and segment ----------------------------------------------------------------------------


def test_neighbour_impacts(bert):
    ids = _ids(8, 9)
    full = paper_loop(bert, ids, [(t, t + 1) for t in range(8)], -1, "euclidean")
    want = (full.diagonal(1) + full.diagonal(-1)) / 2
    got = probe.neighbour_impacts(bert, ids, mask_token_id=MASK)
    _close(got, want)
    am = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    two = torch.stack([ids, _ids(8, 11)])
    got = probe.neighbour_impacts(bert, two, mask_token_id=MASK, attention_mask=am, batch_size=3)
    assert [g.shape[0] for g in got] == [7, 4]
    _close(got[0], want, tight=False)
    full1 = paper_loop(bert, two[1, :5], [(t, t + 1) for t in range(5)], -1, "euclidean")
    _close(got[1], (full1.diagonal(1) + full1.diagonal(-1)) / 2, tight=False)
    # segment reads the same means from the matrix as from the neighbour impacts.
    thr = float(want.median())
    assert probe.segment(full, threshold=thr) == probe.segment(want, threshold=thr)


def test_segment():
    S = torch.tensor([[0.0, 5.0, 0.1, 0.0],
                      [4.0, 0.0, 0.2, 0.0],
                      [0.3, 0.1, 0.0, 2.0],
                      [0.0, 0.0, 3.0, 0.0]])
    # Neighbour means: (0,1) 4.5, (1,2) 0.15, (2,3) 2.5.
    assert probe.segment(S, threshold=1.0) == [2]
    assert probe.segment(S, threshold=3.0) == [2, 3]
    assert probe.segment(S, threshold=0.1) == []
    assert probe.segment(torch.tensor([4.5, 0.15, 2.5]), threshold=1.0) == [2]
    with pytest.raises(ValueError, match="scores"):
        probe.segment(torch.zeros(3, 4), threshold=1.0)
    with pytest.raises(TypeError, match="threshold"):
        probe.segment(S, threshold="1")


# ---- the distance kernel --------------------------------------------------------------------------------------


def _kernel_inputs(dtype, device, R=4, T=9, D=40, W=6, M=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(R, T, D, generator=g, dtype=F64)
    anchors = torch.randn(W, D, generator=g, dtype=F64)
    anchors[0] = states[1, 2:4].mean(0)  # a zero euclidean distance and a cosine distance of 0
    rows = torch.randint(0, R, (M,), generator=g)
    starts = torch.randint(0, T - 3, (M,), generator=g)
    ends = starts + torch.randint(1, 4, (M,), generator=g)
    idx = torch.randint(0, W, (M,), generator=g)
    if M:
        rows[0], starts[0], ends[0], idx[0] = 1, 2, 4, 0
    return [states.to(device, dtype), rows.to(device), starts.to(device), ends.to(device),
            anchors.to(device, dtype), idx.to(device)]


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_distance_kernel(target, dtype, metric):
    args = _kernel_inputs(dtype, target.device)
    got = distance(*args, metric, target.backend)
    want = reference.distance(*[a.cpu().double() if a.is_floating_point() else a.cpu() for a in args], metric)
    assert got.dtype == (F64 if dtype == F64 else torch.float32)
    assert_close(got, want, dtype=dtype, atol=1e-6 if dtype != torch.float16 else 2e-3, name=target.backend)
    # The independent formula (a Python loop) agrees with the reference.
    s, r, st, en, a, i = [t.cpu() for t in args]
    loop = torch.stack([_dist(a[i[m]].double(), s[r[m], st[m]:en[m]].double().mean(0), metric)
                        for m in range(r.shape[0])])
    assert_close(want, loop, dtype=F64, atol=1e-12, name="reference")


def test_distance_empty(target):
    args = _kernel_inputs(torch.float32, target.device, M=0)
    assert distance(*args, "cosine", target.backend).shape == (0,)


def test_distance_opcheck(target):
    if target.backend == "reference":
        pytest.skip("the reference is plain PyTorch, not a kernel op")
    op = torch.ops.fastml.perturbed_masking_distance
    if target.backend == "triton":
        op = torch.ops.fastml.perturbed_masking_distance_triton
    for metric in ("euclidean", "cosine"):
        torch.library.opcheck(op.default, (*_kernel_inputs(torch.float32, target.device, M=5), metric))


def test_distance_kernel_bad_args(target):
    states, rows, starts, ends, anchors, idx = _kernel_inputs(torch.float32, target.device)
    bad_end = ends.clone()
    bad_end[3] = states.shape[1] + 1
    with pytest.raises((ValueError, RuntimeError), match="span"):
        distance(states, rows, starts, bad_end, anchors, idx, "euclidean", target.backend)
    bad_row = rows.clone()
    bad_row[0] = -1
    with pytest.raises((ValueError, RuntimeError), match="rows"):
        distance(states, bad_row, starts, ends, anchors, idx, "euclidean", target.backend)
    with pytest.raises((ValueError, RuntimeError), match="anchor_index"):
        distance(states, rows, starts, ends, anchors, idx + 100, "euclidean", target.backend)
    with pytest.raises((ValueError, RuntimeError), match="metric"):
        distance(states, rows, starts, ends, anchors, idx, "manhattan", target.backend)


def test_backends_agree(bert, target):
    ids = _ids(7, 12)
    spans = [(0, 2), (2, 3), (3, 5), (5, 7)]
    want = probe.impact_matrix(bert, ids, mask_token_id=MASK, word_spans=spans, backend="reference")
    got = probe.impact_matrix(bert.to(target.device), ids.to(target.device), mask_token_id=MASK, word_spans=spans,
                              backend=target.backend)
    _close(got.cpu(), want.double())


# ---- bad inputs and untouched inputs ----------------------------------------------------------------------------


def test_bad_inputs(bert):
    ids = _ids(6, 13)
    with pytest.raises(ValueError, match="mask_token_id"):
        probe.impact_matrix(bert, ids, mask_token_id=None)
    with pytest.raises(ValueError, match="overlap"):
        probe.impact_matrix(bert, ids, mask_token_id=MASK, word_spans=[(0, 3), (2, 4)])
    with pytest.raises(ValueError, match="word_spans"):
        probe.impact_matrix(bert, ids, mask_token_id=MASK, word_spans=[(4, 7)])
    with pytest.raises(ValueError, match="word_spans"):
        probe.impact_matrix(bert, ids, mask_token_id=MASK, word_spans=[(3, 3)])
    with pytest.raises(ValueError, match="metric"):
        probe.impact_matrix(bert, ids, mask_token_id=MASK, metric="manhattan")
    with pytest.raises(IndexError, match="layer"):
        probe.impact_matrix(bert, ids, mask_token_id=MASK, layer=4)
    with pytest.raises(IndexError, match="layer"):
        probe.impact_matrix(bert, ids, mask_token_id=MASK, layer=-5)
    with pytest.raises(ValueError, match="mask_token_id"):
        probe.neighbour_impacts(bert, ids, mask_token_id=None)
    am = torch.tensor([1, 1, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="right-padded"):
        probe.impact_matrix(bert, ids, mask_token_id=MASK, attention_mask=am)
    two = torch.stack([ids, ids])
    with pytest.raises(ValueError, match="word_spans"):  # one list of spans per sentence
        probe.impact_matrix(bert, two, mask_token_id=MASK, word_spans=[[(0, 1)]])
    with pytest.raises(ValueError, match="word_spans"):  # a span past the sentence's real tokens
        probe.impact_matrix(bert, two, mask_token_id=MASK, attention_mask=torch.tensor([[1] * 6, [1] * 3 + [0] * 3]),
                            word_spans=[[(0, 1)], [(2, 4)]])
    with pytest.raises(TypeError, match="input_ids"):
        probe.impact_matrix(bert, ids.double(), mask_token_id=MASK)
    with pytest.raises(ValueError, match="batch_size"):
        probe.impact_matrix(bert, ids, mask_token_id=MASK, batch_size=0)
    with pytest.raises(TypeError, match="encoder"):
        probe.impact_matrix(None, ids, mask_token_id=MASK)


def test_inputs_not_modified(bert):
    ids = torch.stack([_ids(6, 14), _ids(6, 15)])
    am = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    spans = [[(0, 2), (2, 6)], [(1, 2), (2, 4)]]
    before = (ids.clone(), am.clone(), [list(s) for s in spans])
    probe.impact_matrix(bert, ids, mask_token_id=MASK, attention_mask=am, word_spans=spans)
    probe.neighbour_impacts(bert, ids, mask_token_id=MASK, attention_mask=am)
    assert torch.equal(ids, before[0]) and torch.equal(am, before[1]) and spans == before[2]


def test_import_fastml_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, fastml, fastml.probe; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "1"})


# ---- parse ------------------------------------------------------------------------------------------------------


class _Tokenizer:
    """A stand-in fast tokenizer: [CLS]=1, words of 1 or 2 tokens (2 when longer than 4 letters), [SEP]=2."""

    mask_token_id = MASK

    class _Enc(dict):
        def __init__(self, ids, wid):
            super().__init__(input_ids=torch.tensor([ids]))
            self._wid = wid

        def word_ids(self, index=0):
            return self._wid

    def __call__(self, words, is_split_into_words=True, return_tensors="pt"):
        ids, wid = [1], [None]
        for k, w in enumerate(words):
            for piece in range(1 + (len(w) > 4)):
                ids.append(4 + (sum(map(ord, w)) + piece) % (VOCAB - 4))
                wid.append(k)
        return self._Enc(ids + [2], wid + [None])


@pytest.mark.skipif(probe.eisner is None, reason="the tree decoders are not in this build")
def test_parse(bert):
    words = "the quick brown fox jumps over lazy dogs".split()
    result = probe.parse(bert, _Tokenizer(), words, layer=2)
    enc = _Tokenizer()(words)
    spans, t = [], 1
    for w in words:
        k = 1 + (len(w) > 4)
        spans.append((t, t + k))
        t += k
    want = probe.impact_matrix(bert, enc["input_ids"][0], mask_token_id=MASK, word_spans=spans, layer=2)
    _close(result.impact, want)
    n = len(words)
    assert result.arc_scores.shape == (n + 1, n + 1)
    assert torch.equal(result.arc_scores[1:, 1:], result.impact.t()) and not result.arc_scores[0].any()
    assert result.heads == probe.eisner(result.arc_scores)[1:].tolist()
    assert len(result.heads) == n and all(0 <= h <= n and h != k + 1 for k, h in enumerate(result.heads))
    assert 0 in result.heads
    assert result.tree == probe.mart(result.impact)
    assert result.bracketed().replace("(", "").replace(")", "").split() == words
    with pytest.raises(ValueError, match="words"):
        probe.parse(bert, _Tokenizer(), [])


def test_load_encoder_without_transformers():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "from fastml import probe\n"
            "try:\n    probe.load_encoder('anything')\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}).stdout
    assert "pip install fastml[probe]" in out


def test_head_model_and_final_norm_model():
    """A model with a task head runs its base model when cut; a model whose layers are followed by a final norm
    (Megatron-BERT) is not cut: both equal the paper's loop on their own hidden states."""
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(_bert().config).double().eval()
    ids = _ids(6, 5)
    spans = [(t, t + 1) for t in range(6)]
    got = probe.impact_matrix(mlm, ids, mask_token_id=MASK, layer=1)
    _close(got, paper_loop(mlm, ids, spans, 1, "euclidean"))
    cfg = transformers.MegatronBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                          num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                                          initializer_range=0.3)
    megatron = transformers.MegatronBertModel(cfg).double().eval()
    got = probe.impact_matrix(megatron, ids, mask_token_id=MASK, layer=1)
    _close(got, paper_loop(megatron, ids, spans, 1, "euclidean"))


def test_mask_token_outside_the_vocabulary(bert):
    with pytest.raises(ValueError, match="mask_token_id"):
        probe.impact_matrix(bert, _ids(5, 0), mask_token_id=VOCAB)


def test_no_words_keeps_dtype_and_device(bert):
    got = probe.impact_matrix(bert, _ids(5, 0)[None], mask_token_id=MASK, word_spans=[[]])
    assert got[0].shape == (0, 0) and got[0].dtype == F64
