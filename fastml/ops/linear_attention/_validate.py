"""Argument checks for the linear-attention functions. Each error names the argument at fault."""
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NAMED_MAPS = (None, "elu+1", "relu")


def check_feature_map(feature_map):
    if callable(feature_map) or feature_map in NAMED_MAPS:
        return
    raise ValueError(f"feature_map must be None, 'elu+1', 'relu' or a callable, got {feature_map!r}")


def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_qkv(q, k, v, *, causal, step=False, after_map=False):
    """q,k [B,H,T,K] (step: [B,H,K]), v [B,H,T,V] (step: [B,H,V]); non-causal k,v may have their own length."""
    where = " after the feature map" if after_map else ""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_tensor(t, name + where)
    ndim, layout = (3, "[B, H, K]") if step else (4, "[B, H, T, K]")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != ndim:
            raise ValueError(f"{name}{where} must be {ndim}-D {layout}, got shape {list(t.shape)}")
    for t, name in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}{where} has dtype {t.dtype} but q has {q.dtype}; pass one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; pass tensors on one device")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(f"q, k and v must share batch and heads [B, H]: q {list(q.shape)}, k {list(k.shape)}, "
                         f"v {list(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k{where} must have q's feature dim K = {q.shape[-1]}, got {k.shape[-1]}")
    if not step and k.shape[2] != v.shape[2]:
        raise ValueError(f"v must have k's sequence length {k.shape[2]}, got {v.shape[2]}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"k must have q's sequence length T = {q.shape[2]} in causal attention, got {k.shape[2]}")


def check_scalars(*, normalize, eps, scale, output_final_state=False):
    """Returns (eps, scale) as Python floats (a numpy or fractions value is accepted as any real number)."""
    for value, name in ((normalize, "normalize"), (output_final_state, "output_final_state")):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    for value, name in ((eps, "eps"), (scale, "scale")):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy floats are Real too
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(eps), float(scale)


def check_state(state, name, shape, dtype, device):
    """A LinearAttentionState (or a (kv, z) pair) with kv [N,H,K,V], z [N,H,K] in the state dtype."""
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"{name} must be a LinearAttentionState (kv, z), got {type(state).__name__}")
    kv, z = state
    N, H, K, V = shape
    for t, part, want in ((kv, "kv", (N, H, K, V)), (z, "z", (N, H, K))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}.{part} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name}.{part} must have dtype {dtype} (the state dtype for these inputs), got {t.dtype}")
        if tuple(t.shape) != want:
            raise ValueError(f"{name}.{part} must have shape {list(want)}, got {list(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}.{part} is on {t.device} but q is on {device}")
    return kv, z


def check_cu_seqlens(cu_seqlens, q):
    """Returns the number of sequences N. Values are checked in eager mode only (they need a host read)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N+1] with N >= 1, got shape {list(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs q, k, v packed with batch size 1, got B = {q.shape[0]}")
    if not torch.compiler.is_compiling():
        reason = cu_seqlens_error(cu_seqlens.tolist(), q.shape[2])
        if reason is not None:
            raise ValueError(reason)
    return cu_seqlens.numel() - 1


def cu_seqlens_error(vals, T):
    """What is wrong with the offsets `vals` (a list) of sequences packed in T tokens, or None: the one statement of
    the rule (0 first, non-decreasing, T last), shared by the public functions and the kernel ops' check."""
    if vals[0] != 0:
        return f"cu_seqlens must start at 0, got {vals[0]}"
    if vals[-1] != T:
        return f"cu_seqlens must end at the sequence length T = {T}, got {vals[-1]}"
    bad = next((i for i in range(len(vals) - 1) if vals[i + 1] < vals[i]), None)
    if bad is not None:
        return f"cu_seqlens must be non-decreasing, got {vals[bad]} then {vals[bad + 1]} at index {bad}"
    return None
