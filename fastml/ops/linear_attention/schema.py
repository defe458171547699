"""The kernel ops of linear attention, declared once for the C++ kernels (fastml::linear_attention_*) and their
Triton twins (fastml::linear_attention_*_triton).

feature_map is an int code: 0 identity, 1 elu+1, 2 relu (applied inside the kernels; a callable map is applied in
Python first and the kernels get 0). Shapes: q, k [B, H, T, K], v [B, H, T, V]; kv0 [N, H, K, V] and z0 [N, H, K]
in the accumulation dtype (float32, float64 for float64 inputs); cu_seqlens [N+1] int64 or None (then N = B).

- linear_attention_fwd -> (o [B, H, T, V] in the input dtype, final kv [N, H, K, V], final z [N, H, K],
  den [B, H, T] = q'.z_t + eps, which the backward reuses).
- linear_attention_bwd: gradients for raw q, k (through the feature map and scale), v and the initial state;
  grad_kv / grad_z are the gradients of the returned final state (None when it was unused); dkv0 and dz0 are
  always returned.
- linear_attention_step: one decode token, q, k [B, H, K], v [B, H, V], kv [B, H, K, V], z [B, H, K] ->
  (o [B, H, V], kv', z'); the state passed in is not modified.
- linear_attention_kv_sum: what a whole slice adds to the state, k [B, H, T, K], v [B, H, T, V] ->
  (sum_t k'_t v_t^T [B, H, K, V], sum_t k'_t [B, H, K]) in the accumulation dtype (no scale: k' = phi(k)).
- linear_attention_start_grad: the gradient of a slice's outputs with respect to the state it started from,
  (grad_o, q, o, den, feature_map, normalize, scale) -> (sum_t q'_t dn_t^T [B, H, K, V], sum_t q'_t dd_t [B, H, K])
  with dn = grad_o / den and dd = -(grad_o . o) / den (normalize; else dn = grad_o, dd = 0). These two serve the
  sequence-parallel op and have C++ kernels only (no Triton twin): elsewhere it uses their torch forms
  (fastml.distributed.sequence_parallel).
- linear_attention_bwd_sweep: one of the backward's two sweeps, linear_attention_bwd's arguments without cu_seqlens
  plus `sweep`: 0 -> (dq, and four empty tensors), 1 -> (empty, dk, dv, dkv0, dz0). C++ only, for the
  sequence-parallel op, which runs dq while the later ranks' gradients travel.
"""
import torch

from fastml._library import OpSchema, declare
from fastml._numerics import acc_dtype
from fastml.ops.linear_attention._validate import cu_seqlens_error


def _fail(cls, msg):
    raise cls(f"fastml::linear_attention: {msg}")


def _check_like(t, name, shape, dtype, device):
    if t.shape != tuple(shape):
        _fail(ValueError, f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != dtype:
        _fail(TypeError, f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        _fail(ValueError, f"{name} is on {t.device} but q is on {device}")


def check_cu_seqlens(cu_seqlens, T):
    """The values of cu_seqlens (0 first, non-decreasing, T last). Run by the Triton launchers because a compiled
    caller skips the public function's checks (torch.compile treats the op as opaque). On a GPU without a host
    sync: torch._assert_async fails at a later synchronizing call, and the kernels clamp every segment into
    [0, T] meanwhile, so a bad value never reads or writes out of bounds. On the CPU (the interpreter) a
    ValueError."""
    if cu_seqlens.dtype != torch.int64:
        _fail(TypeError, f"cu_seqlens must be an int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        _fail(ValueError, f"cu_seqlens must be 1-D [N+1], got shape {list(cu_seqlens.shape)}")
    if cu_seqlens.is_cuda:
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == T) & (cu_seqlens.diff() >= 0).all()
        torch._assert_async(ok, f"cu_seqlens must start at 0, be non-decreasing and end at T = {T}")
        return
    reason = cu_seqlens_error(cu_seqlens.tolist(), T)
    if reason is not None:
        _fail(ValueError, reason)


def _check_fwd(q, k, v, kv0, z0, cu_seqlens, feature_map, normalize, eps, scale):
    """Argument checks of the kernel ops (the public functions check more, and earlier): shapes, dtypes, devices,
    so that a direct call with bad arguments is an error, never an out-of-bounds access."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        _fail(ValueError, f"q, k, v must be 4-D, got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if not q.is_floating_point():
        _fail(TypeError, f"q must be a floating tensor, got {q.dtype}")
    B, H, T, K = q.shape
    _check_like(k, "k", q.shape, q.dtype, q.device)
    _check_like(v, "v", (B, H, T, v.shape[3]), q.dtype, q.device)
    if feature_map not in (0, 1, 2):
        _fail(ValueError, f"feature_map must be 0, 1 or 2, got {feature_map}")
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.device != q.device:
            _fail(ValueError, f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
        if B != 1:
            _fail(ValueError, f"with cu_seqlens the batch size must be 1, got {B}")
        check_cu_seqlens(cu_seqlens, T)
        N = cu_seqlens.shape[0] - 1
    if (kv0 is None) != (z0 is None):
        _fail(ValueError, "kv0 and z0 must be given together")
    if kv0 is not None:
        sd = acc_dtype(q.dtype)
        _check_like(kv0, "kv0", (N, H, K, v.shape[3]), sd, q.device)
        _check_like(z0, "z0", (N, H, K), sd, q.device)


def _check_bwd(grad_o, grad_kv, grad_z, q, k, v, o, den, kv0, z0, cu_seqlens, feature_map, normalize, eps, scale):
    _check_fwd(q, k, v, kv0, z0, cu_seqlens, feature_map, normalize, eps, scale)
    B, H, T, K = q.shape
    V = v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    sd = acc_dtype(q.dtype)
    _check_like(grad_o, "grad_o", v.shape, q.dtype, q.device)
    _check_like(o, "o", v.shape, q.dtype, q.device)
    _check_like(den, "den", (B, H, T), sd, q.device)
    if grad_kv is not None:
        _check_like(grad_kv, "grad_kv", (N, H, K, V), sd, q.device)
    if grad_z is not None:
        _check_like(grad_z, "grad_z", (N, H, K), sd, q.device)


def _check_step(q, k, v, kv, z, feature_map, normalize, eps, scale):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        _fail(ValueError, f"q, k, v must be 3-D [B, H, K|V], got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if not q.is_floating_point():
        _fail(TypeError, f"q must be a floating tensor, got {q.dtype}")
    B, H, K = q.shape
    V = v.shape[2]
    _check_like(k, "k", q.shape, q.dtype, q.device)
    _check_like(v, "v", (B, H, V), q.dtype, q.device)
    if feature_map not in (0, 1, 2):
        _fail(ValueError, f"feature_map must be 0, 1 or 2, got {feature_map}")
    sd = acc_dtype(q.dtype)
    _check_like(kv, "kv", (B, H, K, V), sd, q.device)
    _check_like(z, "z", (B, H, K), sd, q.device)


def _fwd(q, k, v, kv0, z0, cu_seqlens, feature_map, normalize, eps, scale):
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    sd = acc_dtype(q.dtype)
    return (v.new_empty(B, H, T, V), q.new_empty(N, H, K, V, dtype=sd), q.new_empty(N, H, K, dtype=sd),
            q.new_empty(B, H, T, dtype=sd))


def _bwd(grad_o, grad_kv, grad_z, q, k, v, o, den, kv0, z0, cu_seqlens, feature_map, normalize, eps, scale):
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    sd = acc_dtype(q.dtype)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(N, H, K, V, dtype=sd),
            q.new_empty(N, H, K, dtype=sd))


def _check_kv_sum(k, v, feature_map):
    if k.dim() != 4 or v.dim() != 4:
        _fail(ValueError, f"k, v must be 4-D, got {k.dim()}-D, {v.dim()}-D")
    if not k.is_floating_point():
        _fail(TypeError, f"k must be a floating tensor, got {k.dtype}")
    B, H, T, _ = k.shape
    _check_like(v, "v", (B, H, T, v.shape[3]), k.dtype, k.device)
    if feature_map not in (0, 1, 2):
        _fail(ValueError, f"feature_map must be 0, 1 or 2, got {feature_map}")


def _check_start_grad(grad_o, q, o, den, feature_map, normalize, scale):
    _check_kv_sum(q, grad_o, feature_map)
    B, H, T, K = q.shape
    _check_like(o, "o", grad_o.shape, q.dtype, q.device)
    _check_like(den, "den", (B, H, T), acc_dtype(q.dtype), q.device)


def _kv_sum(k, v, feature_map):
    B, H, T, K = k.shape
    sd = acc_dtype(k.dtype)
    return k.new_empty(B, H, K, v.shape[3], dtype=sd), k.new_empty(B, H, K, dtype=sd)


def _start_grad(grad_o, q, o, den, feature_map, normalize, scale):
    return _kv_sum(q, grad_o, feature_map)


def _check_bwd_sweep(grad_o, grad_kv, grad_z, q, k, v, o, den, kv0, z0, feature_map, normalize, eps, scale,
                     sweep):
    if sweep not in (0, 1):
        _fail(ValueError, f"sweep must be 0 or 1, got {sweep}")
    _check_bwd(grad_o, grad_kv, grad_z, q, k, v, o, den, kv0, z0, None, feature_map, normalize, eps, scale)


def _bwd_sweep(grad_o, grad_kv, grad_z, q, k, v, o, den, kv0, z0, feature_map, normalize, eps, scale, sweep):
    full = _bwd(grad_o, grad_kv, grad_z, q, k, v, o, den, kv0, z0, None, feature_map, normalize, eps, scale)
    keep = (True, False, False, False, False) if sweep == 0 else (False, True, True, True, True)
    return tuple(t if kept else t.new_empty(0) for t, kept in zip(full, keep))


def _step(q, k, v, kv, z, feature_map, normalize, eps, scale):
    return v.new_empty(v.shape), kv.new_empty(kv.shape), z.new_empty(z.shape)


FWD = OpSchema("linear_attention_fwd",
               "(Tensor q, Tensor k, Tensor v, Tensor? kv0, Tensor? z0, Tensor? cu_seqlens, int feature_map, "
               "bool normalize, float eps, float scale) -> (Tensor, Tensor, Tensor, Tensor)", _fwd, check=_check_fwd)
BWD = OpSchema("linear_attention_bwd",
               "(Tensor grad_o, Tensor? grad_kv, Tensor? grad_z, Tensor q, Tensor k, Tensor v, Tensor o, "
               "Tensor den, Tensor? kv0, Tensor? z0, Tensor? cu_seqlens, int feature_map, bool normalize, "
               "float eps, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", _bwd, check=_check_bwd)
STEP = OpSchema("linear_attention_step",
                "(Tensor q, Tensor k, Tensor v, Tensor kv, Tensor z, int feature_map, bool normalize, float eps, "
                "float scale) -> (Tensor, Tensor, Tensor)", _step, check=_check_step)
KV_SUM = OpSchema("linear_attention_kv_sum", "(Tensor k, Tensor v, int feature_map) -> (Tensor, Tensor)", _kv_sum,
                  twins=(), check=_check_kv_sum)
START_GRAD = OpSchema("linear_attention_start_grad",
                      "(Tensor grad_o, Tensor q, Tensor o, Tensor den, int feature_map, bool normalize, "
                      "float scale) -> (Tensor, Tensor)", _start_grad, twins=(), check=_check_start_grad)
BWD_SWEEP = OpSchema("linear_attention_bwd_sweep",
                     "(Tensor grad_o, Tensor? grad_kv, Tensor? grad_z, Tensor q, Tensor k, Tensor v, Tensor o, "
                     "Tensor den, Tensor? kv0, Tensor? z0, int feature_map, bool normalize, float eps, float scale, "
                     "int sweep) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", _bwd_sweep, twins=(),
                     check=_check_bwd_sweep)
declare(FWD, BWD, STEP, KV_SUM, START_GRAD, BWD_SWEEP)
