"""Integrations with other libraries. Each lives in its own module and imports its library only when that module
is imported (`import fastml` imports none of them):

- fastml.integrations.transformers: logits processors for Hugging Face `model.generate` (consistent top-k / top-p
  / min-p sampling that always keeps eos, and the self-terminating model's log-probabilities). Needs
  `pip install fastml[transformers]`.
"""
