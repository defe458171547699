"""One assert_close for tests and benchmarks: per-dtype tolerances, reports the worst error and where."""
import torch

# (rtol, atol) per dtype of the computation being checked. atol is relative to the largest |expected| when that
# exceeds 1, so sums over long sequences are judged by their own scale.
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (2e-4, 2e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (3e-2, 1e-2),
}


def tolerances(dtype):
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def assert_close(actual, expected, *, dtype=None, rtol=None, atol=None, equal_nan=False, name="tensor"):
    """Assert |actual - expected| <= atol * max(1, max|expected|) + rtol * |expected| elementwise (an infinite
    expected value only by an equal one).

    dtype picks the tolerances (default: the lower precision of the two tensors). NaN in `actual` fails unless
    `equal_nan` and `expected` has NaN at the same place. Shapes must match exactly.
    """
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise TypeError(f"{name}: assert_close compares tensors, got {type(actual)} and {type(expected)}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if dtype is None:
        dtype = min((actual.dtype, expected.dtype), key=lambda d: torch.finfo(d).bits if d.is_floating_point else 64)
    d_rtol, d_atol = tolerances(dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    if equal_nan:
        if not torch.equal(a_nan, e_nan):
            idx = torch.nonzero(a_nan != e_nan)[0].tolist()
            raise AssertionError(f"{name}: NaN pattern differs, first at index {idx}")
    elif a_nan.any() or e_nan.any():
        idx = torch.nonzero(a_nan | e_nan)[0].tolist()
        raise AssertionError(f"{name}: NaN at index {idx} (actual NaN: {bool(a_nan.any())})")
    a = torch.where(a_nan, 0.0, a)
    e = torch.where(e_nan, 0.0, e)
    if a.numel() == 0:
        return
    err = (a - e).abs()
    finite_e = e[torch.isfinite(e)]
    scale = max(1.0, finite_e.abs().max().item()) if finite_e.numel() else 1.0
    # An infinite expected value must be matched exactly (rtol * inf would accept anything).
    allowed = torch.where(torch.isfinite(e), atol * scale + rtol * e.abs(), 0.0)
    bad = ~(err <= allowed) & ~(a == e)
    if bad.any():
        excess = torch.where(bad, err - allowed, torch.zeros_like(err))
        flat = int(torch.argmax(excess.flatten()))
        idx = list(torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else []
        idx = [int(i) for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements differ (dtype {dtype}, rtol {rtol}, atol {atol}); "
            f"max abs error {err.max().item():.3e}; worst at index {idx}: actual {a.flatten()[flat].item():.6e}, "
            f"expected {e.flatten()[flat].item():.6e}"
        )
