"""Comparisons for tests and benchmarks: an element-wise check with per-dtype tolerances (`assert_close`) and a
norm-wise check for results that a kernel may sum in another order over long lengths (`assert_close_norm`).

Why these tolerances. A result is compared with the float64 truth computed from the same (already rounded) inputs,
so what separates them is rounding inside the computation: the final rounding to the dtype (one unit roundoff u),
the few intermediates kept in the dtype, and the float32 (float64 for float64) accumulations, whose error grows
with the number of terms. Each tolerance is u of the dtype times a growth factor:

    dtype      u = 2**-(mantissa bits + 1)   growth   rtol = atol
    float64    1.1e-16                        2**16    7.3e-12   (accumulations of up to ~1e4 terms)
    float32    6.0e-8                         2**8     1.5e-5    (accumulations of a few hundred terms)
    float16    4.9e-4                         8        3.9e-3    (float32 accumulation: a few roundings to fp16)
    bfloat16   3.9e-3                         8        3.1e-2    (likewise)

atol equals rtol: it is the error allowed on an element whose value is near zero because terms of order one
cancel (test data are of order one); it is NOT scaled by the largest expected value, so a small element that is
wrong fails however large its neighbours are. Results that are sums over long sequences, added in chunk order by
one backend and token order by another, can carry an absolute error proportional to the size of their terms on
elements that cancel to near zero; check those with `assert_close_norm`, whose criterion is the norm of the error
relative to the norm of the expected value.
"""
import torch

UNIT_ROUNDOFF = {
    torch.float64: 2.0 ** -53,
    torch.float32: 2.0 ** -24,
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
}
GROWTH = {torch.float64: 2.0 ** 16, torch.float32: 2.0 ** 8, torch.float16: 8.0, torch.bfloat16: 8.0}
# (rtol, atol) per dtype of the computation being checked.
TOLERANCES = {d: (UNIT_ROUNDOFF[d] * GROWTH[d], UNIT_ROUNDOFF[d] * GROWTH[d]) for d in UNIT_ROUNDOFF}


def tolerances(dtype):
    """(rtol, atol) for a computation in `dtype` (float32's for a dtype not in the table)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def _least_precise(actual, expected):
    return min((actual.dtype, expected.dtype), key=lambda d: torch.finfo(d).bits if d.is_floating_point else 64)


def _prepare(actual, expected, name):
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise TypeError(f"{name}: the comparison takes tensors, got {type(actual)} and {type(expected)}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    return actual.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64)


def _check_nan(a, e, equal_nan, name):
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    if equal_nan:
        if not torch.equal(a_nan, e_nan):
            idx = torch.nonzero(a_nan != e_nan)[0].tolist()
            raise AssertionError(f"{name}: NaN pattern differs, first at index {idx}")
    elif a_nan.any() or e_nan.any():
        idx = torch.nonzero(a_nan | e_nan)[0].tolist()
        raise AssertionError(f"{name}: NaN at index {idx} (actual NaN: {bool(a_nan.any())})")
    return torch.where(a_nan, 0.0, a), torch.where(e_nan, 0.0, e)


def assert_close(actual, expected, *, dtype=None, rtol=None, atol=None, equal_nan=False, name="tensor"):
    """Assert |actual - expected| <= atol + rtol * |expected| for every element (an infinite expected value only
    by an equal one).

    dtype picks the tolerances (default: the lower precision of the two tensors; see the module docstring for
    their derivation); rtol/atol override them. NaN in either tensor fails unless `equal_nan` and both have NaN
    at the same places. Shapes must match exactly.
    """
    a, e = _prepare(actual, expected, name)
    dtype = dtype or _least_precise(actual, expected)
    d_rtol, d_atol = tolerances(dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a, e = _check_nan(a, e, equal_nan, name)
    if a.numel() == 0:
        return
    err = (a - e).abs()
    # An infinite expected value must be matched exactly (rtol * inf would accept anything).
    allowed = torch.where(torch.isfinite(e), atol + rtol * e.abs(), 0.0)
    bad = ~(err <= allowed) & ~(a == e)
    if bad.any():
        excess = torch.where(bad, err / allowed.clamp_min(1e-300), torch.zeros_like(err))
        flat = int(torch.argmax(excess.flatten()))
        idx = [int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)] if a.dim() else []
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements differ (dtype {dtype}, rtol {rtol:.2e}, "
            f"atol {atol:.2e}); max abs error {err.max().item():.3e}; worst at index {idx}: actual "
            f"{a.flatten()[flat].item():.6e}, expected {e.flatten()[flat].item():.6e}"
        )


def assert_close_norm(actual, expected, *, dtype=None, rtol=None, atol=None, dim=None, name="tensor"):
    """Assert ||actual - expected|| <= rtol * ||expected|| + atol * sqrt(n) (Euclidean norms of n elements), over
    the whole tensor or, with `dim`, for every slice along those dims (e.g. dim=-1: each row on its own, so one
    wrong row is not hidden by the rest of the tensor). The atol term (an error of atol per element) only matters
    for a slice whose expected value is zero up to rounding.

    For results that a kernel legitimately sums in another order over long lengths, where an element that
    cancels to near zero carries the absolute error of its (larger) terms. dtype picks rtol and atol as in
    assert_close.
    Any NaN or infinity fails unless both tensors have the same one at the same place.
    """
    a, e = _prepare(actual, expected, name)
    dtype = dtype or _least_precise(actual, expected)
    d_rtol, d_atol = tolerances(dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    same = a == e
    nonfinite = ~torch.isfinite(a) | ~torch.isfinite(e)
    if (nonfinite & ~same).any():
        idx = torch.nonzero(nonfinite & ~same)[0].tolist()
        raise AssertionError(f"{name}: non-finite value at index {idx} differs: actual "
                             f"{a[tuple(idx)].item()}, expected {e[tuple(idx)].item()}")
    a, e = torch.where(nonfinite, 0.0, a), torch.where(nonfinite, 0.0, e)
    if a.numel() == 0:
        return
    dims = tuple(range(a.dim())) if dim is None else dim
    err = torch.linalg.vector_norm(a - e, dim=dims)
    ref = torch.linalg.vector_norm(e, dim=dims)
    n = a.numel() // max(err.numel(), 1)
    allowed = rtol * ref + atol * n ** 0.5
    bad = ~(err <= allowed) & (err > 0)
    if bad.any():
        ratio = torch.where(bad, err / allowed.clamp_min(1e-300), torch.zeros_like(err))
        flat = int(torch.argmax(ratio.flatten()))
        where = "" if ratio.dim() == 0 else (
            f" in slice {[int(i) for i in torch.unravel_index(torch.tensor(flat), ratio.shape)]}")
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} slices differ (dtype {dtype}, rtol {rtol:.2e}, "
            f"atol {atol:.2e}); worst{where}: ||error|| {err.flatten()[flat].item():.3e}, ||expected|| {ref.flatten()[flat].item():.3e}"
        )
