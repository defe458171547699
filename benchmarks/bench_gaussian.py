"""Gaussian latent ops: the fused sample + KL against eager PyTorch written the usual way.

Eager: z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) and KL = 0.5 * (exp(logvar) + mu^2 - 1 - logvar)
summed per sample. CPU (`make bench`): B=256 latents of 64 x 16 x 16 per sample, float32; CUDA: B=256 latents of
256 x 32 x 32 per sample, bfloat16. "fwd+bwd" back-propagates a gradient into z and into the per-sample KL.
"saved MB" is what the autograd graph keeps for the backward (unique storages seen by saved_tensors_hooks),
"beyond inputs MB" the part of it that is not mu or logvar themselves (the memory the op adds).
"""
import torch

import fastml

CPU_SHAPE, GPU_SHAPE = (256, 64, 16, 16), (256, 256, 32, 32)
_EAGER_MS = {}


def eager_kl(mu, logvar):
    kl = 0.5 * (torch.exp(logvar) + mu.pow(2) - 1.0 - logvar)
    return kl.sum(dim=tuple(range(1, mu.dim())))


def eager(mu, logvar):
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    return z, eager_kl(mu, logvar)


def saved_mb(fn, inputs):
    """(MB of unique storages the graph of fn()'s outputs keeps for its backward, MB of those that are not
    `inputs`): the tensors saved for backward, plus buffers a fastml autograd node holds outside them (the
    gradients a fused forward wrote, kept as `ctx.buffers`)."""
    storages = {}

    def add(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def pack(t):
        add(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = fn()
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    seen, stack = set(), [o.grad_fn for o in outs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for t in getattr(node, "buffers", None) or ():
            add(t)
        stack.extend(f for f, _ in node.next_functions)
    own = {t.untyped_storage().data_ptr() for t in inputs}
    total = sum(storages.values())
    beyond = sum(n for p, n in storages.items() if p not in own)
    return total / 2**20, beyond / 2**20


def _cases(device):
    backends = ["eager", "reference", "triton"] if device == "cuda" else ["eager", "reference", "cpp"]
    return [(op, p, b) for op in ("gaussian_sample_kl", "gaussian_kl") for p in ("fwd", "fwd+bwd") for b in backends]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config.getoption("--device"))
        metafunc.parametrize("case", cases, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in cases])


def test_gaussian(benchmark, case, device, results):
    from runner import time_ms

    op, kind, backend = case
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    mu = torch.randn(shape, device=device, dtype=dtype, generator=g)
    lv = torch.randn(shape, device=device, dtype=dtype, generator=g) * 0.5
    leaves = [t.detach().requires_grad_(kind == "fwd+bwd") for t in (mu, lv)]
    gz = torch.randn(shape, device=device, dtype=dtype, generator=g)

    def forward():
        if backend == "eager":
            return eager(*leaves) if op == "gaussian_sample_kl" else (None, eager_kl(*leaves))
        if op == "gaussian_sample_kl":
            return fastml.gaussian_sample_kl(*leaves, backend=backend)
        return None, fastml.gaussian_kl(*leaves, backend=backend)

    def fn():
        with torch.set_grad_enabled(kind == "fwd+bwd"):
            z, kl = forward()
        if kind == "fwd+bwd":
            outs = [kl.sum()] + ([] if z is None else [z])
            grads = [None] + ([] if z is None else [gz])
            torch.autograd.backward(outs, grads)
            for t in leaves:
                t.grad = None

    ms = time_ms(benchmark, fn, device, rounds=5)
    key = (op, kind)
    if backend == "eager":
        _EAGER_MS[key] = ms
    ref = _EAGER_MS.get(key)
    row = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""), "pass": kind,
           "backend": backend, "ms": ms, "x eager": (ref / ms) if ref else ""}
    if kind == "fwd+bwd":
        total, beyond = saved_mb(lambda: [t for t in forward() if t is not None], leaves)
        row.update({"saved MB": total, "beyond inputs MB": beyond})
    results.add(f"{op} ({device})", row)
