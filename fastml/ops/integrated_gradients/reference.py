"""Reference path kernels in plain PyTorch: the source of truth for the cpp, triton and cuda backends.

Both functions follow the schemas of fastml::ig_scale_inputs and fastml::ig_accumulate (csrc/fastml.cpp).
"""

from fastml._numerics import acc_dtype


def ig_scale_inputs(inputs, baselines, alphas):
    """[S*B, ...] = baselines + alphas[s] * (inputs - baselines), step-major, computed in the accumulation dtype
    and returned in the inputs' dtype."""
    dt = acc_dtype(inputs.dtype)
    x = inputs.to(dt)
    xb = baselines.to(dt)
    a = alphas.to(dt).view(-1, *([1] * inputs.dim()))
    out = xb.unsqueeze(0) + a * (x - xb).unsqueeze(0)
    return out.reshape(-1, *inputs.shape[1:]).to(inputs.dtype)


def ig_accumulate(grads, inputs, baselines, weights, multiply_by_inputs, acc):
    """(attr [B, ...], sums [B]): total = acc + sum_s weights[s] * grads[s*B + b]; attr = total * (x - x') when
    multiply_by_inputs else total; sums = attr summed over every dim but the first. Accumulation dtype."""
    dt = acc_dtype(inputs.dtype)
    S, B = weights.shape[0], inputs.shape[0]
    g = grads.to(dt).reshape(S, B, *inputs.shape[1:])
    w = weights.to(dt).view(S, *([1] * inputs.dim()))
    total = (w * g).sum(0)
    if acc is not None:
        total = total + acc.to(dt)
    attr = total * (inputs.to(dt) - baselines.to(dt)) if multiply_by_inputs else total
    return attr, attr.reshape(B, attr[0].numel() if B else 0).sum(1)
