"""The counter-based random numbers of fastml's kernels, in plain PyTorch: the definitions the C++ and Triton
kernels reproduce bit for bit (csrc/common.h `counter_mix`, kernels/common.py `counter_mix`).

A draw never depends on the order in which elements are visited: it is a hash of a counter (the element's index,
or a row and a column) and a 64-bit key, the "seed", taken once per call from a torch.Generator.

    mix(x) = 32-bit integer finalizer: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b;
             x ^= x >> 16 (all modulo 2^32)

The tensor versions below use int64 arithmetic on values in [0, 2^32), with the products split so none overflows.
"""
import torch

MASK = 0xFFFFFFFF
M1, M2 = 0x7FEB352D, 0x846CA68B


def mul32(x, m):
    """(x * m) mod 2^32 for int64 tensors x in [0, 2^32), a constant m < 2^32, without int64 overflow."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK


def mix(x):
    """The 32-bit finalizer (module docstring) of an int64 tensor holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = mul32(x, M1)
    x = x ^ (x >> 15)
    x = mul32(x, M2)
    return x ^ (x >> 16)


def split_seed(seed):
    """(k0, k1): the low and high 32 bits of a non-negative int64 seed tensor [1]."""
    seed = seed.reshape(()).to(torch.int64)
    return seed & MASK, (seed >> 32) & MASK


def draw_seed(generator, device, like="the input"):
    """The key of one call: an int64 tensor [1] in [0, 2^62) on `device`, drawn from `generator` (torch's default
    generator when None), which it advances. `like` names the tensor whose device the generator must match."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but {like} is on {device}")
    return torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)
