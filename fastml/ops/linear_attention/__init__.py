"""Causal and non-causal linear attention ("Transformers are RNNs"): public functions, validation, autograd.

Backends: `reference` (reference.py), `cpp` (csrc/cpu/linear_attention.cpp) and `cuda`
(csrc/cuda/linear_attention.cu), both behind the torch ops fastml::linear_attention_{fwd,bwd,step}, and `triton`
(kernels/linear_attention.py) behind fastml::linear_attention_{fwd,bwd,step}_triton. The maths and the decisions
are in README.md beside this file.
"""
from typing import Callable, NamedTuple, Optional

import torch

from fastml import _backend
from fastml._autograd import refuse_double_backward
from fastml._numerics import acc_dtype
from fastml.ops.linear_attention import reference, schema  # noqa: F401  (schema declares the kernel ops)
from fastml.ops.linear_attention._cuda_limits import cuda_smem_reason
from fastml.ops.linear_attention._validate import (
    check_cu_seqlens,
    check_feature_map,
    check_qkv,
    check_scalars,
    check_state,
)

OP = "causal_linear_attention"
STEP_OP = "linear_attention_step"
NONCAUSAL_OP = "linear_attention"


class LinearAttentionState(NamedTuple):
    """The recurrent state after a prefix: kv [B, H, K, V] = sum k' v^T and z [B, H, K] = sum k' (float32, or
    float64 for float64 inputs)."""

    kv: torch.Tensor
    z: torch.Tensor


class _Impl(NamedTuple):
    """What a linear-attention backend runs: `causal(q, k, v, kv0, z0, cu_seqlens, code, normalize, eps, scale)
    -> (o, kv, z)`, differentiable, and `step(q, k, v, kv0, z0, code, normalize, eps, scale) -> (o, kv, z)`.
    `kernels`: the (fwd, bwd) ops behind `causal` for a kernel backend (see schema.py), None for the reference;
    the sequence-parallel op calls them directly (it needs den and gives the final state's gradient first)."""

    causal: Callable
    step: Callable
    kernels: Optional[tuple] = None


def _kernel_impl(fwd, bwd, step):
    """The implementation of a kernel backend from its three torch ops (fastml::linear_attention_* or their
    triton twins): one autograd.Function over fwd/bwd, and the step op for decoding without gradients."""

    class _CausalFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, kv0, z0, cu_seqlens, feature_map, normalize, eps, scale):
            o, kv, z, den = fwd(q, k, v, kv0, z0, cu_seqlens, feature_map, normalize, eps, scale)
            ctx.save_for_backward(q, k, v, o, den, kv0, z0, cu_seqlens)
            ctx.args = (feature_map, normalize, eps, scale)
            ctx.set_materialize_grads(False)
            return o, kv, z

        @staticmethod
        def backward(ctx, do, dkv, dz):
            refuse_double_backward("linear-attention kernels")
            q, k, v, o, den, kv0, z0, cu_seqlens = ctx.saved_tensors
            if do is None:
                do = torch.zeros_like(o)
            dq, dk, dv, dkv0, dz0 = bwd(do.contiguous(), None if dkv is None else dkv.contiguous(),
                                        None if dz is None else dz.contiguous(), q, k, v, o, den, kv0, z0,
                                        cu_seqlens, *ctx.args)
            return (dq, dk, dv, dkv0 if kv0 is not None else None, dz0 if z0 is not None else None,
                    None, None, None, None, None)

    def causal(q, k, v, kv0, z0, cu_seqlens, code, normalize, eps, scale):
        cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64)
        return _CausalFn.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                               None if kv0 is None else kv0.contiguous(), None if z0 is None else z0.contiguous(),
                               cu, code, normalize, eps, scale)

    def decode(q, k, v, kv0, z0, code, normalize, eps, scale):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, kv0, z0)):
            # The differentiable path: the causal kernels on a sequence of one token.
            o, kv, z = causal(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), kv0, z0, None, code, normalize, eps,
                              scale)
            return o.squeeze(2), kv, z
        return step(q.contiguous(), k.contiguous(), v.contiguous(), kv0.contiguous(), z0.contiguous(), code,
                    normalize, eps, scale)

    return _Impl(causal, decode, (fwd, bwd))


def _reference_causal(q, k, v, kv0, z0, cu_seqlens, code, normalize, eps, scale):
    return reference.causal_linear_attention(q, k, v, feature_map=code, normalize=normalize, eps=eps, scale=scale,
                                             initial_state=None if kv0 is None else (kv0, z0), cu_seqlens=cu_seqlens)


def _reference_step(q, k, v, kv0, z0, code, normalize, eps, scale):
    return reference.linear_attention_step(q, k, v, (kv0, z0), feature_map=code, normalize=normalize, eps=eps,
                                           scale=scale)


def _map_callable(q, k, feature_map):
    """Apply a callable feature map in Python (autograd flows through it); kernels then see code 0."""
    if callable(feature_map):
        return feature_map(q), feature_map(k), 0
    return q, k, reference.FEATURE_MAPS[feature_map]


def causal_linear_attention(q, k, v, *, feature_map=None, normalize=True, eps=1e-6, scale=1.0, initial_state=None,
                            output_final_state=False, cu_seqlens=None, backend="auto"):
    """Causal linear attention.

    q, k: [B, H, T, K]; v: [B, H, T, V]; float32, float16, bfloat16 or float64, on one device.
    With phi the feature map (None, "elu+1", "relu" or a callable), q' = scale * phi(q), k' = phi(k):
        S_t = S_0 + sum_{s<=t} k'_s v_s^T,  z_t = z_0 + sum_{s<=t} k'_s,
        o_t = q'_t S_t / (q'_t . z_t + eps)   (o_t = q'_t S_t if normalize=False).
    initial_state: LinearAttentionState (kv [N, H, K, V], z [N, H, K]) or None (zeros); gradients flow into it.
    cu_seqlens: int32/int64 [N+1] offsets of N independent sequences packed in T (then B must be 1).
    Returns o [B, H, T, V] in the input dtype, or (o, LinearAttentionState) with output_final_state=True.
    """
    check_feature_map(feature_map)
    check_qkv(q, k, v, causal=True)
    eps, scale = check_scalars(normalize=normalize, eps=eps, scale=scale, output_final_state=output_final_state)
    q, k, code = _map_callable(q, k, feature_map)
    if feature_map is not None and callable(feature_map):
        check_qkv(q, k, v, causal=True, after_map=True)
    B, H, T, K = q.shape
    V = v.shape[-1]
    n_seq = B
    if cu_seqlens is not None:
        n_seq = check_cu_seqlens(cu_seqlens, q)
    sd = acc_dtype(q.dtype)
    kv0 = z0 = None
    if initial_state is not None:
        kv0, z0 = check_state(initial_state, "initial_state", (n_seq, H, K, V), sd, q.device)
    call = _backend.Call(q.device, q.dtype, {"cu_seqlens": cu_seqlens is not None, "K": K, "V": V})
    impl = _backend.select(OP, call, backend).impl
    o, kv, z = impl.causal(q, k, v, kv0, z0, cu_seqlens, code, bool(normalize), float(eps), float(scale))
    if output_final_state:
        return o, LinearAttentionState(kv, z)
    return o


def linear_attention_step(q, k, v, state, *, feature_map=None, normalize=True, eps=1e-6, scale=1.0,
                          backend="auto"):
    """One decode step of causal linear attention.

    q, k: [B, H, K]; v: [B, H, V]; state: LinearAttentionState (kv [B, H, K, V], z [B, H, K]) or None (zeros).
    Returns (o [B, H, V], the new LinearAttentionState); equals causal_linear_attention on the token appended to
    the prefix the state summarizes. The caller's state is not modified.
    """
    check_feature_map(feature_map)
    check_qkv(q, k, v, causal=False, step=True)
    eps, scale = check_scalars(normalize=normalize, eps=eps, scale=scale)
    q, k, code = _map_callable(q, k, feature_map)
    if feature_map is not None and callable(feature_map):
        check_qkv(q, k, v, causal=False, step=True, after_map=True)
    B, H, K = q.shape
    V = v.shape[-1]
    sd = acc_dtype(q.dtype)
    if state is None:
        kv0, z0 = q.new_zeros(B, H, K, V, dtype=sd), q.new_zeros(B, H, K, dtype=sd)
    else:
        kv0, z0 = check_state(state, "state", (B, H, K, V), sd, q.device)
    call = _backend.Call(q.device, q.dtype, {"step": True, "K": K, "V": V})
    impl = _backend.select(STEP_OP, call, backend).impl
    o, kv, z = impl.step(q, k, v, kv0, z0, code, bool(normalize), float(eps), float(scale))
    return o, LinearAttentionState(kv, z)


def linear_attention(q, k, v, *, feature_map=None, normalize=True, eps=1e-6, scale=1.0, key_padding_mask=None,
                     backend="auto"):
    """Non-causal linear attention: o = q' S / (q' . z + eps) with S = sum_s k'_s v_s^T, z = sum_s k'_s.

    q: [B, H, Tq, K]; k: [B, H, Tk, K]; v: [B, H, Tk, V]; key_padding_mask: [B, Tk] bool, True = padding to ignore.
    This is two matrix products per head, which torch's own GEMMs already run at the machine's speed, so it
    has only the `reference` backend (README.md, "Decisions"): naming another raises BackendUnavailable.
    """
    check_feature_map(feature_map)
    check_qkv(q, k, v, causal=False)
    eps, scale = check_scalars(normalize=normalize, eps=eps, scale=scale)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool, got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape [B, Tk] = {[k.shape[0], k.shape[2]]}, "
                             f"got {list(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    q, k, code = _map_callable(q, k, feature_map)
    if feature_map is not None and callable(feature_map):
        check_qkv(q, k, v, causal=False, after_map=True)
    run = _backend.select(NONCAUSAL_OP, _backend.Call(q.device, q.dtype), backend).impl
    return run(q, k, v, feature_map=code, normalize=normalize, eps=eps, scale=scale,
               key_padding_mask=key_padding_mask)


def _kernel_head_dims(call):
    K, V = call.options.get("K", 1), call.options.get("V", 1)
    if not (1 <= K <= 256 and 1 <= V <= 256):
        return f"its kernels take head dims K, V from 1 to 256, got K = {K}, V = {V}"
    return None


def _cuda_supports(call):
    return _kernel_head_dims(call) or cuda_smem_reason(call.device, call.options.get("K", 1),
                                                       call.options.get("V", 1), call.dtype)


def _register():
    ops = torch.ops.fastml
    # cpp and cuda are the CPU and CUDA kernels of the same C++ ops (the dispatcher picks by device).
    cpp = _kernel_impl(ops.linear_attention_fwd, ops.linear_attention_bwd, ops.linear_attention_step)
    triton = _kernel_impl(ops.linear_attention_fwd_triton, ops.linear_attention_bwd_triton,
                          ops.linear_attention_step_triton)
    ref = _Impl(_reference_causal, _reference_step)
    for op in (OP, STEP_OP):
        _backend.register(op, _backend.Backend("reference", ref))
        _backend.register(op, _backend.Backend("cpp", cpp))
        _backend.register(op, _backend.Backend("cuda", cpp, supports=_cuda_supports))
        _backend.register(op, _backend.Backend("triton", triton, supports=_kernel_head_dims,
                                                 # the triton kernels compute in float32: no float64
                                                 dtypes=(torch.float32, torch.float16, torch.bfloat16)))
        # CUDA tensors: measured on an H100 (README.md, "GPU"), triton is 12x faster than the reference and the
        # cuda kernels are slower than the reference, so `auto` takes triton, then the reference; cuda serves
        # when named.
        _backend.set_priority(op, "cuda", ("triton", "reference"))
    _backend.register(NONCAUSAL_OP, _backend.Backend("reference", reference.linear_attention))


_register()

__all__ = ["LinearAttentionState", "causal_linear_attention", "linear_attention", "linear_attention_step"]
