"""fastml.integrations.transformers with a tiny randomly initialised GPT-2 (no download): the consistent sampling
processor never filters eos and returns exactly fastml.top_k_top_p_filter's scores; the self-terminating processor
returns fastml.self_terminating_log_softmax chained over the generation steps, ends every sequence by the bound's
horizon, and starts afresh for a new generate call; `import fastml` does not import transformers."""
import math
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import fastml  # noqa: E402
from fastml.integrations.transformers import (ConsistentSamplingLogitsProcessor,  # noqa: E402
                                              SelfTerminatingLogitsProcessor)
from fastml.testing import assert_close  # noqa: E402

EOS, BOS, VOCAB = 0, 1, 48


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    return transformers.GPT2LMHeadModel(cfg).eval()


class Record(transformers.LogitsProcessor):
    """Keeps a copy of the scores it sees (and of input_ids), passing them on unchanged."""

    def __init__(self):
        self.scores, self.ids = [], []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.detach().clone())
        self.ids.append(input_ids.detach().clone())
        return scores


class PushEosDown(transformers.LogitsProcessor):
    """Makes eos the least likely token: a model that does not want to stop."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, EOS] = scores.min(-1).values - 5.0
        return scores


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.full((n, 1), BOS), torch.randint(2, VOCAB, (n, 3), generator=g)], 1)


def _generate(model, prompts, processors, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    return model.generate(prompts, attention_mask=torch.ones_like(prompts),
                          logits_processor=transformers.LogitsProcessorList(processors), **kw)


def test_import_fastml_does_not_import_transformers(tmp_path):
    code = "import sys, fastml, fastml.integrations; assert 'transformers' not in sys.modules, 'imported'"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(fastml.__file__))))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("filters", [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3), dict(top_k=5, top_p=0.8,
                                                                                          temperature=0.7)])
def test_consistent_sampling_keeps_eos(model, filters):
    before, after = Record(), Record()
    proc = ConsistentSamplingLogitsProcessor(EOS, **filters)
    _generate(model, _prompts(6), [PushEosDown(), before, proc, after], do_sample=True, max_new_tokens=8)
    assert len(before.scores) >= 1
    filtered_out = 0
    for raw, got in zip(before.scores, after.scores):
        assert bool(torch.isfinite(got[:, EOS]).all()), "eos was filtered"
        assert torch.equal(got, fastml.top_k_top_p_filter(raw, keep_ids=[EOS], **filters))
        # without keep_ids the same filters would remove eos (so the check above can fail)
        plain = fastml.top_k_top_p_filter(raw, **filters)
        filtered_out += int(torch.isinf(plain[:, EOS]).sum())
    assert filtered_out > 0


def test_consistent_processor_several_eos(model):
    rec = Record()
    proc = ConsistentSamplingLogitsProcessor([EOS, 5], top_k=2)
    _generate(model, _prompts(4), [PushEosDown(), proc, rec], do_sample=True, max_new_tokens=4)
    for s in rec.scores:
        assert bool(torch.isfinite(s[:, [EOS, 5]]).all())


def _sampling_horizon(eps, delta=1e-12):
    return next(T for T in range(1, 10000) if T * (T + 1) / 2 * math.log1p(-eps) < math.log(delta))


@pytest.mark.parametrize("do_sample", [True, False])
def test_self_terminating_ends_every_sequence(model, do_sample):
    eps = 0.1
    horizon = _sampling_horizon(eps) if do_sample else math.ceil(math.log(0.5) / math.log1p(-eps))
    raw, out_rec = Record(), Record()
    proc = SelfTerminatingLogitsProcessor(EOS, eps=eps)
    prompts = _prompts(16, seed=1)
    out = _generate(model, prompts, [PushEosDown(), raw, proc, out_rec], do_sample=do_sample,
                    max_new_tokens=horizon + 20)
    gen = out[:, prompts.shape[1]:]
    ended = (gen[:, :horizon] == EOS).any(1)
    assert bool(ended.all()), f"{int((~ended).sum())} sequences ran past step {horizon}"
    # The processor's output is fastml's self-terminating log-softmax chained over the steps.
    la = None
    for r, got in zip(raw.scores, out_rec.scores):
        want, la = fastml.self_terminating_log_softmax(r, EOS, eps=eps, log_alpha_prev=la)
        assert_close(got, want)
    assert_close(proc.log_alpha, la)
    # Without the processor the same model does not stop within that many steps.
    plain = _generate(model, prompts, [PushEosDown()], do_sample=do_sample, max_new_tokens=horizon)
    assert not bool((plain[:, prompts.shape[1]:] == EOS).any(1).any())


def test_self_terminating_new_generate_starts_afresh(model):
    eps = 0.05
    proc = SelfTerminatingLogitsProcessor(EOS, eps=eps)
    rec_raw, rec_out = Record(), Record()
    _generate(model, _prompts(4), [PushEosDown(), proc], do_sample=True, max_new_tokens=5)
    assert proc.log_alpha is not None
    # another batch (size and prompts): step 1 again
    _generate(model, _prompts(3, seed=7), [PushEosDown(), rec_raw, proc, rec_out], do_sample=True, max_new_tokens=3)
    first, _ = fastml.self_terminating_log_softmax(rec_raw.scores[0], EOS, eps=eps)
    assert_close(rec_out.scores[0], first)
    # same batch size and prompt length as the first call's last step, other prompts: also step 1
    rec_raw2, rec_out2 = Record(), Record()
    _generate(model, _prompts(4, seed=9)[:, :3], [PushEosDown(), rec_raw2, proc, rec_out2], do_sample=True,
              max_new_tokens=2)
    first, _ = fastml.self_terminating_log_softmax(rec_raw2.scores[0], EOS, eps=eps)
    assert_close(rec_out2.scores[0], first)


def test_self_terminating_follows_reordered_rows():
    """Rows reordered between steps take the log_alpha of the row they continue."""
    proc = SelfTerminatingLogitsProcessor(EOS, eps=0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (3, 4), generator=g)
    s1 = torch.randn(3, VOCAB, generator=g)
    proc(ids, s1)
    la1 = proc.log_alpha.clone()
    perm = torch.tensor([2, 0, 0])
    ids2 = torch.cat([ids[perm], torch.tensor([[5], [6], [7]])], 1)
    s2 = torch.randn(3, VOCAB, generator=g)
    got = proc(ids2, s2)
    want, _ = fastml.self_terminating_log_softmax(s2, EOS, eps=0.1, log_alpha_prev=la1[perm])
    assert_close(got, want)
    proc.reset()
    assert proc.log_alpha is None


def test_processor_arguments():
    with pytest.raises(ValueError, match="single"):
        SelfTerminatingLogitsProcessor([0, 1])
    with pytest.raises(TypeError, match="eos_token_id"):
        ConsistentSamplingLogitsProcessor("eos")
    with pytest.raises(IndexError, match="eos_token_id"):
        ConsistentSamplingLogitsProcessor(-1)
    with pytest.raises(IndexError, match="eos_id"):
        SelfTerminatingLogitsProcessor(VOCAB)(torch.zeros(2, 3, dtype=torch.long), torch.randn(2, VOCAB))


def test_self_terminating_refuses_a_suppressed_eos():
    """An eos score already at -inf (generate's min_new_tokens ran first) would end every row at once: refused."""
    proc = SelfTerminatingLogitsProcessor(EOS, eps=0.1)
    scores = torch.randn(2, VOCAB)
    scores[1, EOS] = float("-inf")
    with pytest.raises(ValueError, match="min_new_tokens"):
        proc(torch.zeros(2, 3, dtype=torch.long), scores)
