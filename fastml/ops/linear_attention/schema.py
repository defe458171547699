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
"""
from fastml._library import OpSchema, declare
from fastml._numerics import acc_dtype


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


def _step(q, k, v, kv, z, feature_map, normalize, eps, scale):
    return v.new_empty(v.shape), kv.new_empty(kv.shape), z.new_empty(z.shape)


FWD = OpSchema("linear_attention_fwd",
               "(Tensor q, Tensor k, Tensor v, Tensor? kv0, Tensor? z0, Tensor? cu_seqlens, int feature_map, "
               "bool normalize, float eps, float scale) -> (Tensor, Tensor, Tensor, Tensor)", _fwd)
BWD = OpSchema("linear_attention_bwd",
               "(Tensor grad_o, Tensor? grad_kv, Tensor? grad_z, Tensor q, Tensor k, Tensor v, Tensor o, "
               "Tensor den, Tensor? kv0, Tensor? z0, Tensor? cu_seqlens, int feature_map, bool normalize, "
               "float eps, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", _bwd)
STEP = OpSchema("linear_attention_step",
                "(Tensor q, Tensor k, Tensor v, Tensor kv, Tensor z, int feature_map, bool normalize, float eps, "
                "float scale) -> (Tensor, Tensor, Tensor)", _step)
declare(FWD, BWD, STEP)
