"""Shared memory of the CUDA linear-attention kernels, and whether a GPU can give it.

Every pass of the CUDA kernels (csrc/cuda/linear_attention_scan.cuh) is one chunked scan whose block keeps its
operand tiles and its state in shared memory; the launcher asks for `scan_layout<T>(DK).total` bytes, DK being the
pass's contraction width rounded up to 16: K for the forward and the dv pass, V + 1 for the dq and dk passes (the
normalizer rides along as an extra column). How much a block may have differs by GPU (99 KB on sm_86/sm_89,
163 KB on A100, 227 KB on H100), so large head dims fit some GPUs and not others. The formula below mirrors
scan_layout; keep the two in step. Nothing here queries a device at import time.
"""
from typing import Optional

import torch

# Tile<T> of linear_attention_scan.cuh: chunk length C, output tile BN, row padding PAD (elements of T) and PADA
# (elements of the accumulation type), and the sizes of T and of the accumulation type.
_TILES = {
    torch.float16: dict(C=64, BN=64, PAD=8, PADA=4, elem=2, acc=4),
    torch.bfloat16: dict(C=64, BN=64, PAD=8, PADA=4, elem=2, acc=4),
    torch.float32: dict(C=32, BN=64, PAD=1, PADA=1, elem=4, acc=4),
    torch.float64: dict(C=16, BN=32, PAD=1, PADA=1, elem=8, acc=8),
}
_ALIGN = 128  # every region starts on a 128-byte boundary


def _round_up(x, m):
    return (x + m - 1) // m * m


def scan_smem_bytes(DK: int, dtype: torch.dtype) -> int:
    """Bytes of dynamic shared memory one scan block asks for, for a contraction width DK (a multiple of 16)."""
    if dtype not in _TILES:
        raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    t = _TILES[dtype]
    C, BN, PAD, PADA, e, a = t["C"], t["BN"], t["PAD"], t["PADA"], t["elem"], t["acc"]
    half = e == 2
    ldq, ldv, lds, lda = DK + PAD, BN + PAD, BN + PADA, C + PADA
    lde = ldv if half else lds
    ldae = C + PAD if half else lda
    regions = [C * ldq * e, C * ldq * e, C * ldv * e,  # Qa, Ka, Vb
               DK * lds * a]  # the state, in the accumulation type
    if half:
        regions.append(DK * lde * e)  # its 16-bit copy for the tensor cores
    regions.append(C * lda * a)  # scores
    if half:
        regions.append(C * ldae * e)  # their 16-bit copy (the output tile reuses the fp32 scores)
    else:
        regions.append(C * lds * a)  # output tile
    regions += [DK * a, C * a, C * a, C * a]  # z, den, 1/den, -do.o
    off = 0
    for size in regions:
        off = _round_up(off + size, _ALIGN)
    return off


def cuda_smem_bytes(K: int, V: int, dtype: torch.dtype) -> int:
    """The most dynamic shared memory any launch of the CUDA linear-attention ops asks for at head dims K, V: the
    largest of the forward (DK = K) and the backward passes (dq and dk: DK = V + 1; dv: DK = K)."""
    widths = {_round_up(max(K, 0), 16), _round_up(V + 1, 16)}
    return max(scan_smem_bytes(dk, dtype) for dk in widths)


def cuda_smem_reason(device, K: int, V: int, dtype: torch.dtype) -> Optional[str]:
    """Why the CUDA kernels cannot run at head dims K, V in `dtype` on `device` for want of shared memory, or None
    when they fit (or when the device does not say how much a block may have)."""
    try:
        need = cuda_smem_bytes(K, V, dtype)
    except TypeError as exc:
        return str(exc)
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if not limit:
        return None
    if need <= limit:
        return None
    name = getattr(props, "name", str(device))
    return (f"head dims K = {K}, V = {V} in {dtype} need {need} bytes of shared memory per block in the CUDA "
            f"kernels, more than the {limit} that {name} allows; use smaller head dims or another backend")
