"""Hugging Face `generate` integration: logits processors that make decoding terminate.

    from fastml.integrations.transformers import ConsistentSamplingLogitsProcessor, SelfTerminatingLogitsProcessor

    out = model.generate(input_ids, do_sample=True, max_new_tokens=...,
                         logits_processor=[SelfTerminatingLogitsProcessor(eos_id, eps=1e-2),
                                           ConsistentSamplingLogitsProcessor(eos_id, top_k=50, top_p=0.9)])

- `ConsistentSamplingLogitsProcessor`: top-k / top-p / min-p filtering that always keeps the eos token(s)
  (consistent sampling, Welleck et al. 2020), via `fastml.top_k_top_p_filter(..., keep_ids=eos ids)`. Use it in
  place of generate's own `top_k` / `top_p` / `min_p` arguments and leave those unset: generate applies its own
  filters after the processors given to it, and they could remove eos again.
- `SelfTerminatingLogitsProcessor`: reads the model's logits as a self-terminating head and returns that model's
  log-probabilities (`fastml.self_terminating_log_softmax`), so p_t(eos) >= 1 - (1 - eps)^t, t counting the
  generated tokens: greedy decoding stops by step ceil(log(1/2) / log(1 - eps)), sampling with probability that
  tends to 1 very fast. It keeps log_alpha from one generation step to the next (see its docstring for how it
  tells a continued generation from a new one). Meant for a model trained with `fastml.self_terminating_nll`;
  on an ordinary model it imposes the termination bound on top of its logits.

transformers is optional: importing this module without it raises an ImportError that says what to install;
`import fastml` never imports transformers.
"""
import torch

import fastml

try:
    from transformers import LogitsProcessor
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("fastml.integrations.transformers needs Hugging Face transformers: "
                      "pip install fastml[transformers]") from exc

__all__ = ["ConsistentSamplingLogitsProcessor", "SelfTerminatingLogitsProcessor"]


def _eos_list(eos_token_id, name="eos_token_id"):
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(not isinstance(i, int) or isinstance(i, bool) for i in ids):
        raise TypeError(f"{name} must be an int or a non-empty list of ints, got {eos_token_id!r}")
    if any(i < 0 for i in ids):
        raise IndexError(f"{name} must be non-negative token ids, got {ids}")
    return ids


class ConsistentSamplingLogitsProcessor(LogitsProcessor):
    """Consistent top-k / top-p (nucleus) / min-p filtering for `model.generate(do_sample=True)`.

    eos_token_id: an int or a list of ints (every one is always kept); top_k, top_p, min_p, temperature as in
    `fastml.top_k_top_p_filter` (None turns a filter off). Returns the scores divided by the temperature where
    kept and -inf elsewhere, eos tokens always kept (a -inf eos score stays -inf). Stateless."""

    def __init__(self, eos_token_id, *, top_k=None, top_p=None, min_p=None, temperature=1.0, backend="auto"):
        self.eos_token_ids = _eos_list(eos_token_id)
        self.top_k, self.top_p, self.min_p, self.temperature = top_k, top_p, min_p, temperature
        self.backend = backend

    def __call__(self, input_ids, scores):
        keep = torch.tensor(self.eos_token_ids, dtype=torch.long, device=scores.device)
        return fastml.top_k_top_p_filter(scores, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                         min_p=self.min_p, keep_ids=keep, backend=self.backend)


class SelfTerminatingLogitsProcessor(LogitsProcessor):
    """The self-terminating model's log-probabilities from the model's logits, one generation step per call.

    eos_token_id: the one end-of-sequence id the model's head was trained with (an int, or a list holding one);
    eps in (0, 1): p_t(eos) >= 1 - (1 - eps)^t at the t-th generated token.

    Use it with greedy decoding or sampling, not with beam search: there transformers hands the processors
    log-softmaxed scores, not the logits, and the eos probability read from them would be wrong. Settings that
    suppress eos before this processor runs (min_length, min_new_tokens, suppress_tokens with eos) conflict with a
    model that defines p(eos) itself: a row whose eos score arrives as -inf raises ValueError.

    State: log_alpha per row, carried from call to call. A call continues the previous one when its input_ids are
    one token longer and every row's prefix equals a row of the previous call's input_ids (rows may be reordered:
    each row takes the log_alpha of the row it continues). Anything else (a new `generate`
    call, another batch size, new prompts) starts afresh at t = 1. A new generate call whose prompts are exactly
    the previous call's outputs therefore continues the count; call `reset()` to start afresh anyway."""

    def __init__(self, eos_token_id, *, eps=1e-3, backend="auto"):
        ids = _eos_list(eos_token_id)
        if len(ids) != 1:
            raise ValueError(f"eos_token_id must be a single id for the self-terminating model, got {ids}")
        self.eos_token_id = ids[0]
        self.eps = eps
        self.backend = backend
        self.reset()

    def reset(self):
        """Forgets the state: the next call is step 1 of a new generation."""
        self._ids = None
        self._log_alpha = None

    @property
    def log_alpha(self):
        """log_alpha [B] after the last call (None before the first): log P(no eos so far) under the model."""
        return self._log_alpha

    def _previous(self, input_ids):
        prev = self._ids
        if prev is None or input_ids.shape[0] != prev.shape[0] or input_ids.shape[1] != prev.shape[1] + 1 \
                or input_ids.device != prev.device:
            return None
        prefix = input_ids[:, :-1]
        if torch.equal(prefix, prev):
            return self._log_alpha
        match = (prefix[:, None, :] == prev[None, :, :]).all(-1)   # [B new rows, B previous rows]
        if not bool(match.any(1).all()):
            return None
        return self._log_alpha[match.to(torch.int8).argmax(1)]

    def __call__(self, input_ids, scores):
        if self.eos_token_id < scores.shape[-1] and bool(torch.isneginf(scores[:, self.eos_token_id]).any()):
            raise ValueError("the eos score reached SelfTerminatingLogitsProcessor as -inf: a processor before it "
                             "(min_length, min_new_tokens or suppress_tokens in generate) suppressed eos, whose "
                             "probability the self-terminating model defines itself; drop that setting")
        prev = self._previous(input_ids)
        logp, log_alpha = fastml.self_terminating_log_softmax(scores, self.eos_token_id, eps=self.eps,
                                                              log_alpha_prev=prev, backend=self.backend)
        self._ids = input_ids.detach().clone()
        self._log_alpha = log_alpha.detach()
        return logp.to(scores.dtype)
