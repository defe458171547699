"""fastml.testing.assert_close: the per-dtype tolerances hold, and wrong results fail."""
import pytest
import torch

from fastml.testing import assert_close

INF = float("inf")


def test_passes_within_the_dtype_tolerance():
    e = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert_close(e * (1 + 1e-5), e, dtype=torch.float32)
    assert_close(torch.tensor([INF, -INF]), torch.tensor([INF, -INF]))


@pytest.mark.parametrize("actual,expected,kw", [
    ([1.01], [1.0], {}),                                  # beyond float32's rtol
    ([0.0], [INF], {}),                                   # an infinite expected value tolerates nothing else
    ([-INF], [INF], {}),
    ([float("nan")], [1.0], {}),                          # NaN fails unless expected there with equal_nan
    ([1.0], [float("nan")], {"equal_nan": True}),
    ([1.0, 2.0], [1.0, 2.5], {"dtype": torch.bfloat16}),
])
def test_wrong_results_fail(actual, expected, kw):
    with pytest.raises(AssertionError):
        assert_close(torch.tensor(actual), torch.tensor(expected), **kw)


def test_reports_shape_mismatch():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3))
