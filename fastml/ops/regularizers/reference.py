"""The definition of softmax_kl in plain PyTorch (exact in float64); the other regularizers are composite torch
code in __init__.py and need no separate reference."""
import torch

from fastml._numerics import acc_dtype


def softmax_kl_rows(p_logits, q_logits, temperature=1.0):
    """KL(softmax(p / T) || softmax(q / T)) per row [N], in the accumulation dtype (float32 for half inputs)."""
    acc = acc_dtype(p_logits.dtype)
    a = p_logits.to(acc) / temperature
    b = q_logits.to(acc) / temperature
    la = torch.log_softmax(a, dim=-1)
    lb = torch.log_softmax(b, dim=-1)
    P = la.exp()
    # Classes P gives no weight add nothing, even where q's log-probability is -inf (masked before the
    # subtraction, so that no NaN reaches the gradient either).
    live = P > 0
    zero = torch.zeros_like(la)
    return (P * (torch.where(live, la, zero) - torch.where(live, lb, zero))).sum(dim=-1)


def softmax_kl(p_logits, q_logits, *, reduction="batchmean", temperature=1.0):
    rows = softmax_kl_rows(p_logits, q_logits, temperature)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / p_logits.shape[0]
