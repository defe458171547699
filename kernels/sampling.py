"""Triton kernels of sampling, the kernels of the torch ops fastml::sampling_filter_triton and
fastml::sampling_sample_triton (declared in fastml/ops/sampling/schema.py; the kept set and the draw are defined in
fastml/ops/sampling/reference.py).

One program per row, walking the row in blocks; nothing is sorted. Values are compared through an order-preserving
integer key of x = logits / temperature (the float's bits with the sign folded, -0 taken as +0), so a threshold is
the key of an actual token and "x >= threshold" is one integer compare:

1. a pass for NaN / +inf / nothing finite (written to a status the launcher turns into ValueError), the max and
   the smallest and largest finite keys;
2. top-k: bisection on the key for the largest K with #(key >= K) >= k (one counting pass per step; it ends on
   the key of the k-th largest token);
3. top-p: the integer weights of reference.py, their total Z over what top-k left, and bisection on the key for the
   smallest K with (mass of candidates with key > K) < top_p * Z: sums of integers, so every pass gets the same
   numbers in any order and the boundary is the reference's to the token;
4. the filter writes x where key >= threshold and x - max >= log(min_p), filter_value elsewhere, then the
   keep_ids; the sampler runs the Gumbel-max race over the same set with the counter-based noise in float64 (ties
   to the lowest id) and sums exp(x - max) over it for the log-probability.

Divisions are correctly rounded (div_rn), so x is the same float as on the other backends.
"""
import torch
import triton
import triton.language as tl

from fastml._library import implement
from fastml._numerics import acc_dtype
from fastml.kernels.common import counter_mix, device_of

LOG2E = 1.4426950408889634


def _block(V):
    return max(16, min(1024, triton.next_power_of_2(V)))


@triton.jit
def _pivots(prefix, dd, level: tl.constexpr, NBITS: tl.constexpr):
    """The 16 candidate keys of one level of the 4-bit radix descent: the known high bits (prefix) followed by
    each digit dd = 0..15 (signed at the top level, where keys are two's complement)."""
    if level == 0:
        piv = (dd - 8) << (NBITS - 4)
    else:
        piv = prefix + (dd << (NBITS - 4 * (level + 1)))
    return piv


@triton.jit
def _scaled(ptr, offs, mask, t, ACC: tl.constexpr):
    v = tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)
    if ACC == tl.float64:
        return v / t
    else:
        return tl.math.div_rn(v, t)


@triton.jit
def _key(x, ACC: tl.constexpr):
    """Order-preserving int64 key of x (-0 folded onto +0)."""
    x = tl.where(x == 0, tl.zeros_like(x), x)
    if ACC == tl.float64:
        b = x.to(tl.int64, bitcast=True)
        return tl.where(b >= 0, b, b ^ 0x7FFFFFFFFFFFFFFF)
    else:
        b = x.to(tl.int32, bitcast=True)
        return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _weight(d, log2e, hi_ptr, lo_ptr):
    """W(d) of reference.py for float64 d <= 0 (log2e: float64 scalar)."""
    t = tl.maximum(d * log2e, -64.0)
    u = tl.floor(t * 65536.0).to(tl.int64)
    n = u >> 16
    j = u & 0xFFFF
    prod = tl.load(hi_ptr + (j >> 8)) * tl.load(lo_ptr + (j & 255))
    shift = 24 - n
    return tl.where(shift < 63, prod >> tl.minimum(shift, 62), 0)


@triton.jit
def _descend(row, V, t, thr, target, m64, log2e, hi_ptr, lo_ptr, dd, sr, ACC: tl.constexpr, NBITS: tl.constexpr,
             SBLOCK: tl.constexpr, MASS: tl.constexpr):
    """The radix descent of top-k (MASS False) and top-p (MASS True): the largest key K such that the count (or,
    with MASS, the integer weight) of the finite tokens with key >= thr and key >= K is >= target (float64), four
    key bits per pass over the row with 16 candidate keys counted at once."""
    prefix = thr * 0
    for level in tl.static_range(NBITS // 4):
        piv = _pivots(prefix, dd, level, NBITS)
        acc = tl.zeros([16], tl.int64)
        for start in range(0, V, SBLOCK):
            offs = start + sr
            mask = offs < V
            x = _scaled(row, offs, mask, t, ACC)
            k = _key(x, ACC)
            cand = mask & (x > float("-inf")) & (x < float("inf")) & (k >= thr)
            if MASS:
                w = tl.where(cand, _weight(x.to(tl.float64) - m64, log2e, hi_ptr, lo_ptr), 0)
            else:
                w = cand.to(tl.int64)
            acc += tl.sum(tl.where(k[:, None] >= piv[None, :], w[:, None], 0), axis=0)
        d = tl.sum((acc.to(tl.float64) >= target).to(tl.int64), axis=0) - 1
        prefix = tl.sum(tl.where(dd == d, piv, 0), axis=0)
    return prefix


@triton.jit
def _plan(lp, r, V, t, kk, pp, consts, hi_ptr, lo_ptr, ACC: tl.constexpr, NBITS: tl.constexpr,
          BLOCK: tl.constexpr, SBLOCK: tl.constexpr):
    """(status, max, threshold key) of row r (see the module docstring)."""
    ar = tl.arange(0, BLOCK)
    row = lp + r.to(tl.int64) * V
    m = tl.max(tl.full([BLOCK], float("-inf"), ACC), axis=0)
    kmin = tl.max(tl.full([BLOCK], 0x7FFFFFFFFFFFFFFF, tl.int64), axis=0)
    kmax = tl.max(tl.full([BLOCK], -0x7FFFFFFFFFFFFFFF, tl.int64), axis=0)
    nnan = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    npinf = nnan
    nfin = nnan
    for start in range(0, V, BLOCK):
        offs = start + ar
        mask = offs < V
        x = _scaled(row, offs, mask, t, ACC)
        fin = mask & (x > float("-inf")) & (x < float("inf"))
        nnan += tl.sum((mask & (x != x)).to(tl.int32), axis=0)
        npinf += tl.sum((mask & (x == float("inf"))).to(tl.int32), axis=0)
        nfin += tl.sum(fin.to(tl.int32), axis=0)
        m = tl.maximum(m, tl.max(tl.where(fin, x, float("-inf")), axis=0))
        k = _key(x, ACC)
        kmin = tl.minimum(kmin, tl.min(tl.where(fin, k, 0x7FFFFFFFFFFFFFFF), axis=0))
        kmax = tl.maximum(kmax, tl.max(tl.where(fin, k, -0x7FFFFFFFFFFFFFFF), axis=0))
    status = tl.where(nnan > 0, 1, tl.where(npinf > 0, 2, tl.where(nfin == 0, 3, 0)))
    thr = kmin
    if status == 0:
        sr = tl.arange(0, SBLOCK)
        dd = tl.arange(0, 16).to(tl.int64)
        # top-k: the largest K with #(key >= K) >= k
        if (kk > 0) & (kk < nfin):
            thr = _descend(row, V, t, thr, kk.to(tl.float64), m.to(tl.float64), 0.0, hi_ptr, lo_ptr, dd, sr, ACC,
                           NBITS, SBLOCK, False)
        # top-p: the largest K with (integer mass of candidates with key >= K) >= top_p * Z; then every candidate
        # with a larger key has less than top_p * Z above it, and the one at K is the boundary token
        if pp < 1.0:
            log2e = tl.load(consts)
            m64 = m.to(tl.float64)
            z = kmin * 0
            for start in range(0, V, BLOCK):
                offs = start + ar
                mask = offs < V
                x = _scaled(row, offs, mask, t, ACC)
                cand = mask & (x > float("-inf")) & (x < float("inf")) & (_key(x, ACC) >= thr)
                w = _weight(x.to(tl.float64) - m64, log2e, hi_ptr, lo_ptr)
                z += tl.sum(tl.where(cand, w, 0), axis=0)
            bound = pp * z.to(tl.float64)
            if bound > 0:
                thr = _descend(row, V, t, thr, bound, m64, log2e, hi_ptr, lo_ptr, dd, sr, ACC, NBITS, SBLOCK, True)
            else:
                thr = kmax
    return status, m, thr


@triton.jit
def _filter_kernel(lp, out, temp, topk, topp, lmin, keep, nkeep, consts, hi_ptr, lo_ptr, fill, status_ptr, V,
                   ACC: tl.constexpr, NBITS: tl.constexpr, BLOCK: tl.constexpr, SBLOCK: tl.constexpr):
    r = tl.program_id(0)
    t = tl.load(temp + r).to(ACC)
    kk = tl.load(topk + r)
    pp = tl.load(topp + r)
    lmp = tl.load(lmin + r)
    status, m, thr = _plan(lp, r, V, t, kk, pp, consts, hi_ptr, lo_ptr, ACC, NBITS, BLOCK, SBLOCK)
    tl.store(status_ptr + r, status)
    if status == 0:
        ar = tl.arange(0, BLOCK)
        row = lp + r.to(tl.int64) * V
        orow = out + r.to(tl.int64) * V
        m64 = m.to(tl.float64)
        fv = tl.load(fill)
        for start in range(0, V, BLOCK):
            offs = start + ar
            mask = offs < V
            x = _scaled(row, offs, mask, t, ACC)
            keep_ = (x > float("-inf")) & (x < float("inf")) & (_key(x, ACC) >= thr)
            keep_ = keep_ & (x.to(tl.float64) - m64 >= lmp)
            o = tl.where(keep_, x, fv.to(ACC))
            tl.store(orow + offs, o.to(out.dtype.element_ty), mask=mask)
        tl.debug_barrier()
        for j0 in range(0, nkeep, BLOCK):
            jo = j0 + ar
            jm = jo < nkeep
            ids = tl.load(keep + jo, mask=jm, other=0)
            jm = jm & (ids >= 0) & (ids < V)  # the launcher checks the ids; never touch memory outside the row
            x = _scaled(row, ids, jm, t, ACC)
            tl.store(orow + ids, x.to(out.dtype.element_ty), mask=jm)


@triton.jit
def _sample_kernel(lp, tokens, logp, temp, topk, topp, lmin, keep, nkeep, consts, hi_ptr, lo_ptr, seed, status_ptr,
                   V, ACC: tl.constexpr, NBITS: tl.constexpr, LOGP: tl.constexpr, BLOCK: tl.constexpr,
                   SBLOCK: tl.constexpr):
    r = tl.program_id(0)
    ar = tl.arange(0, BLOCK)
    row = lp + r.to(tl.int64) * V
    t = tl.load(temp + r).to(ACC)
    if t == 0:
        # greedy: the lowest id among the maxima
        best = tl.max(tl.full([BLOCK], float("-inf"), ACC), axis=0)
        bi = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0) - 1
        nnan = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
        npinf = nnan
        for start in range(0, V, BLOCK):
            offs = start + ar
            mask = offs < V
            x = tl.load(row + offs, mask=mask, other=float("-inf")).to(ACC)
            nnan += tl.sum((mask & (x != x)).to(tl.int32), axis=0)
            npinf += tl.sum((mask & (x == float("inf"))).to(tl.int32), axis=0)
            xs = tl.where(x == x, x, float("-inf"))
            bm = tl.max(xs, axis=0)
            ba = tl.argmax(xs, axis=0).to(tl.int64) + start
            upd = bm > best
            bi = tl.where(upd, ba, bi)
            best = tl.where(upd, bm, best)
        status = tl.where(nnan > 0, 1, tl.where(npinf > 0, 2, tl.where(bi < 0, 3, 0)))
        tl.store(status_ptr + r, status)
        tl.store(tokens + r, bi)
        if LOGP:
            tl.store(logp + r, 0.0)
    else:
        kk = tl.load(topk + r)
        pp = tl.load(topp + r)
        lmp = tl.load(lmin + r)
        status, m, thr = _plan(lp, r, V, t, kk, pp, consts, hi_ptr, lo_ptr, ACC, NBITS, BLOCK, SBLOCK)
        tl.store(status_ptr + r, status)
        if status == 0:
            m64 = m.to(tl.float64)
            s = tl.load(seed)
            k0 = (s & 0xFFFFFFFF).to(tl.uint32)
            k1 = ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)
            ru = r.to(tl.uint32)
            best = tl.max(tl.full([BLOCK], float("-inf"), tl.float64), axis=0)
            bi = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0) - 1
            total = tl.sum(tl.zeros([BLOCK], tl.float64), axis=0)
            for start in range(0, V, BLOCK):
                offs = start + ar
                mask = offs < V
                x = _scaled(row, offs, mask, t, ACC)
                x64 = x.to(tl.float64)
                keep_ = mask & (x > float("-inf")) & (x < float("inf")) & (_key(x, ACC) >= thr)
                keep_ = keep_ & (x64 - m64 >= lmp)
                c = (offs * 2).to(tl.uint32)
                h1 = counter_mix(counter_mix(counter_mix(c ^ k0) + k1) ^ ru)
                h2 = counter_mix(counter_mix(counter_mix((c + 1) ^ k0) + k1) ^ ru)
                u = (((h1 >> 6).to(tl.int64) << 26) + (h2 >> 6).to(tl.int64)).to(tl.float64)
                u = (u + 0.5) * 2.220446049250313e-16
                g = -tl.log(-tl.log(u))
                sc = tl.where(keep_, x64 + g, float("-inf"))
                if LOGP:
                    total += tl.sum(tl.where(keep_, tl.exp(x64 - m64), 0.0), axis=0)
                bm = tl.max(sc, axis=0)
                ba = tl.argmax(sc, axis=0).to(tl.int64) + start
                upd = bm > best
                bi = tl.where(upd, ba, bi)
                best = tl.where(upd, bm, best)
            for j0 in range(0, nkeep, BLOCK):
                jo = j0 + ar
                jm = jo < nkeep
                ids = tl.load(keep + jo, mask=jm, other=0)
                jm = jm & (ids >= 0) & (ids < V)
                x = _scaled(row, ids, jm, t, ACC)
                x64 = x.to(tl.float64)
                already = (_key(x, ACC) >= thr) & (x64 - m64 >= lmp)
                extra = jm & (x > float("-inf")) & (x < float("inf")) & ~already
                c = (ids * 2).to(tl.uint32)
                h1 = counter_mix(counter_mix(counter_mix(c ^ k0) + k1) ^ ru)
                h2 = counter_mix(counter_mix(counter_mix((c + 1) ^ k0) + k1) ^ ru)
                u = (((h1 >> 6).to(tl.int64) << 26) + (h2 >> 6).to(tl.int64)).to(tl.float64)
                u = (u + 0.5) * 2.220446049250313e-16
                sc = tl.where(extra, x64 - tl.log(-tl.log(u)), float("-inf"))
                if LOGP:
                    total += tl.sum(tl.where(extra, tl.exp(x64 - m64), 0.0), axis=0)
                bm = tl.max(sc, axis=0)
                # ties: the lowest id wins; keep_ids are sorted, so the block's first maximum has its lowest id
                ba = tl.load(keep + j0 + tl.argmax(sc, axis=0))
                upd = (bm > best) | ((bm == best) & (ba < bi))
                bi = tl.where(upd, ba, bi)
                best = tl.where(upd, bm, best)
            tl.store(tokens + r, bi)
            if LOGP:
                xt = _scaled(row, bi, bi >= 0, t, ACC).to(tl.float64)
                tl.store(logp + r, (xt - m64 - tl.log(total)).to(tl.float32))


_TABLES = {}


def _consts(device):
    key = str(device)
    if key not in _TABLES:
        from fastml.ops.sampling import reference

        hi, lo = reference.tables(device)
        _TABLES[key] = (torch.tensor([LOG2E], dtype=torch.float64, device=device), hi, lo)
    return _TABLES[key]


def _raise(status):
    bad = (status != 0).nonzero()
    if bad.numel():
        r = int(bad[0, 0])
        code = int(status[r])
        what = {1: "contains NaN", 2: "contains +inf (after dividing by the temperature)", 3: "has no finite value"}
        raise ValueError(f"logits row {r} {what[code]}")


def _meta(dtype, V):
    wide = acc_dtype(dtype) == torch.float64
    block = _block(V)
    return dict(ACC=tl.float64 if wide else tl.float32, NBITS=64 if wide else 32, BLOCK=block,
                SBLOCK=min(block, 256))


@implement("sampling_filter", "triton")
def sampling_filter_triton(logits, temperature, top_k, top_p, log_min_p, keep_ids, filter_value):
    if bool((temperature <= 0).any()):
        raise ValueError("fastml::sampling: the filter needs temperature > 0")
    B, V = logits.shape
    out = torch.empty_like(logits)
    status = torch.zeros((B,), dtype=torch.int32, device=logits.device)
    if B:
        consts, hi, lo = _consts(logits.device)
        fill = torch.tensor([filter_value], dtype=torch.float64, device=logits.device)
        with device_of(logits):
            _filter_kernel[(B,)](logits, out, temperature, top_k, top_p, log_min_p, keep_ids, keep_ids.numel(),
                                 consts, hi, lo, fill, status, V, **_meta(logits.dtype, V))
        _raise(status)
    return out


@implement("sampling_sample", "triton")
def sampling_sample_triton(logits, temperature, top_k, top_p, log_min_p, keep_ids, seed, logprobs):
    B, V = logits.shape
    tokens = torch.empty((B,), dtype=torch.int64, device=logits.device)
    lps = torch.empty((B if logprobs else 0,), dtype=torch.float32, device=logits.device)
    status = torch.zeros((B,), dtype=torch.int32, device=logits.device)
    if B:
        consts, hi, lo = _consts(logits.device)
        with device_of(logits):
            _sample_kernel[(B,)](logits, tokens, lps if logprobs else tokens, temperature, top_k, top_p, log_min_p,
                                 keep_ids, keep_ids.numel(), consts, hi, lo, seed, status, V,
                                 LOGP=bool(logprobs), **_meta(logits.dtype, V))
        _raise(status)
    return tokens, lps
