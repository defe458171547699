"""Pieces shared by the Triton kernels: interpreter-aware autotuning, device guard, feature maps."""
import contextlib

import torch
import triton
import triton.language as tl

from fastml._backend import triton_interpret


def autotune(configs, key, prune=None):
    """triton.autotune over `configs` (`prune(configs, named_args)` drops those unfit for a call); under
    TRITON_INTERPRET=1 only the first one, since the interpreter cannot benchmark several configs (no driver)."""
    if triton_interpret():
        return triton.autotune(configs=configs[:1], key=key)
    return triton.autotune(configs=configs, key=key,
                           prune_configs_by=None if prune is None else {"early_config_prune": prune})


def device_of(t):
    """Launch on t's GPU (Triton launches on the current device); nothing to do for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dot_types(dtype):
    """(operand dtype, input precision) of tl.dot for inputs of `dtype`, accumulating in float32.

    bfloat16 keeps bfloat16 operands (float32's range, so scaled values such as do / den stay representable).
    float16 operands would underflow there (den grows with T), so float16 inputs multiply float32 operands in TF32,
    which has float16's mantissa and float32's range. float32 inputs multiply in full IEEE float32.
    """
    if dtype == torch.bfloat16:
        return tl.bfloat16, "ieee"
    if dtype == torch.float16:
        return tl.float32, "tf32"
    return tl.float32, "ieee"


def pow2(n, lo=16):
    return max(lo, triton.next_power_of_2(n))


@triton.jit
def feature_map(x, FMAP: tl.constexpr):
    """phi(x): 0 identity, 1 elu+1, 2 relu."""
    # Written with tl.where, not tl.minimum / tl.maximum, whose default drops NaN: NaN in gives NaN out.
    if FMAP == 1:
        x = tl.where(x > 0, x + 1.0, tl.exp(tl.where(x > 0, 0.0, x)))
    elif FMAP == 2:
        x = tl.where(x < 0, 0.0, x)
    return x


@triton.jit
def feature_map_grad(g, x, FMAP: tl.constexpr):
    """g * phi'(x)."""
    if FMAP == 1:
        g = g * tl.exp(tl.where(x > 0, 0.0, x))
    elif FMAP == 2:
        g = tl.where(x <= 0, 0.0, g)  # as torch's relu backward: NaN passes the gradient
    return g


@triton.jit
def segment(cu_ptr, i_n, T, VARLEN: tl.constexpr):
    """(batch row, first token, end token) of sequence i_n: a packed segment of cu_seqlens, or batch entry i_n.

    The offsets are clamped to 0 <= bos <= eos <= T, so that a bad cu_seqlens (the launchers check its values, but
    on the GPU without waiting for the result) can never make a kernel read or write outside the tensors."""
    if VARLEN:
        b = 0
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
        bos = tl.minimum(tl.maximum(bos, 0), T)
        eos = tl.minimum(tl.maximum(eos, bos), T)
    else:
        b = i_n
        bos = 0
        eos = T
    return b, bos, eos


@triton.jit
def scan_program(cu_ptr, T, H, VARLEN: tl.constexpr):
    """What a program of the scan kernels owns: (sequence x head index, tile index, row of its head's first token
    in the [B*H*T] token rows, first token, end token). The grid is (sequences x heads, tiles): the batch-sized
    count goes on axis 0, which takes up to 2^31 - 1 programs (axes 1 and 2 stop at 65535)."""
    i_nh = tl.program_id(0)
    i_tile = tl.program_id(1)
    b, bos, eos = segment(cu_ptr, i_nh // H, T, VARLEN)
    row0 = (b * H + i_nh % H).to(tl.int64) * T
    return i_nh, i_tile, row0, bos, eos


@triton.jit
def load_state(kv_ptr, z_ptr, i_nh, ok, ov, K: tl.constexpr, V: tl.constexpr, LOAD_KV: tl.constexpr,
               LOAD_Z: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The [BK, BV] tile (rows ok, columns ov) of head i_nh's state in a [N*H, K, V] tensor, and the [BK] tile of
    its normalizer in a [N*H, K] tensor, in float32; zeros for the ones not loaded."""
    mk = ok < K
    if LOAD_KV:
        S = tl.load(kv_ptr + i_nh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :],
                    mask=mk[:, None] & (ov < V)[None, :], other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    if LOAD_Z:
        zs = tl.load(z_ptr + i_nh.to(tl.int64) * K + ok, mask=mk, other=0.0).to(tl.float32)
    else:
        zs = tl.zeros([BK], dtype=tl.float32)
    return S, zs


@triton.jit
def store_state(kv_ptr, z_ptr, S, zs, i_nh, ok, ov, K: tl.constexpr, V: tl.constexpr, WITH_Z):
    """Stores what load_state loads (the normalizer tile only when WITH_Z: one value tile of each head does)."""
    mk = ok < K
    tl.store(kv_ptr + i_nh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :], S,
             mask=mk[:, None] & (ov < V)[None, :])
    if WITH_Z:
        tl.store(z_ptr + i_nh.to(tl.int64) * K + ok, zs, mask=mk)


@triton.jit
def load_tile(ptr, tok, cols, mt, W: tl.constexpr, BW: tl.constexpr):
    """Rows `tok` (int64 token indices, read where mt, else 0) and columns `cols` of a row-major [*, W] tensor.
    The column mask is compiled in only when W does not fill the tiles."""
    if W % BW == 0:
        x = tl.load(ptr + tok[:, None] * W + cols[None, :], mask=mt[:, None], other=0.0)
    else:
        x = tl.load(ptr + tok[:, None] * W + cols[None, :], mask=mt[:, None] & (cols < W)[None, :], other=0.0)
    return x


@triton.jit
def store_tile(ptr, x, tok, cols, mt, W: tl.constexpr, BW: tl.constexpr):
    if W % BW == 0:
        tl.store(ptr + tok[:, None] * W + cols[None, :], x.to(ptr.dtype.element_ty), mask=mt[:, None])
    else:
        tl.store(ptr + tok[:, None] * W + cols[None, :], x.to(ptr.dtype.element_ty),
                 mask=mt[:, None] & (cols < W)[None, :])


@triton.jit
def features(x, cols, FMAP: tl.constexpr, W: tl.constexpr, BW: tl.constexpr):
    """phi(x) in float32 for a tile read by load_tile. Padded columns stay zero (elu+1 maps the zeros read there to
    1, so it needs the mask; identity and relu keep 0). Padded rows are left as they are: every product that meets
    them also meets a zero row of v or do, except the key sums, which use masked_colsum."""
    f = feature_map(x.to(tl.float32), FMAP)
    if FMAP == 1 and W % BW != 0:
        f = tl.where((cols < W)[None, :], f, 0.0)
    return f


@triton.jit
def masked_colsum(f, mt, FMAP: tl.constexpr):
    """Sum over the rows of a `features` tile, leaving out padded rows (non-zero only under elu+1)."""
    if FMAP == 1:
        f = tl.where(mt[:, None], f, 0.0)
    return tl.sum(f, 0)


@triton.jit
def counter_mix(x):
    """The 32-bit finalizer of fastml's counter-based random numbers (fastml/_random.py) on uint32 values."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x
