"""fastml.testing: the element-wise check judges every element by its own size (a wrong small element fails
however large its neighbours), the norm-wise check judges each slice, and wrong results fail."""
import pytest
import torch

from fastml.testing import TOLERANCES, UNIT_ROUNDOFF, assert_close, assert_close_norm

INF, NAN = float("inf"), float("nan")


def test_tolerances_are_a_modest_multiple_of_the_unit_roundoff():
    for dtype, (rtol, atol) in TOLERANCES.items():
        assert torch.finfo(dtype).eps / 2 == UNIT_ROUNDOFF[dtype]
        assert UNIT_ROUNDOFF[dtype] < rtol <= 2 ** 16 * UNIT_ROUNDOFF[dtype] and atol == rtol
    # More precise dtypes get tighter tolerances.
    order = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    assert [TOLERANCES[d][0] for d in order] == sorted(TOLERANCES[d][0] for d in order)


def test_passes_within_the_dtype_tolerance():
    e = torch.tensor([1.0, -2.0, 300.0, 1e-3], dtype=torch.float64)
    assert_close(e * (1 + 1e-5), e, dtype=torch.float32)
    assert_close(e * (1 + 1e-2), e, dtype=torch.bfloat16)
    assert_close(e.to(torch.bfloat16), e)  # one rounding to bfloat16
    assert_close(torch.tensor([INF, -INF]), torch.tensor([INF, -INF]))
    assert_close(torch.tensor([NAN, 1.0]), torch.tensor([NAN, 1.0]), equal_nan=True)


@pytest.mark.parametrize("actual,expected,kw", [
    ([1.01], [1.0], {}),                                        # beyond float32's rtol
    ([0.0], [INF], {}),                                         # an infinite expected value tolerates nothing else
    ([-INF], [INF], {}),
    ([NAN], [1.0], {}),                                         # NaN fails unless expected there with equal_nan
    ([1.0], [NAN], {"equal_nan": True}),
    ([1.0, 2.0], [1.0, 2.5], {"dtype": torch.bfloat16}),
    # The flaw of a tolerance scaled by the largest expected value: in bfloat16 an element 100 times smaller
    # than the largest, 100% wrong, passed (|2 - 1| <= 1e-2 * 100 + 3e-2 * 1). Now it fails.
    ([100.0, 2.0], [100.0, 1.0], {"dtype": torch.bfloat16}),
    ([1.0, 0.1], [1.0, 0.05], {"dtype": torch.bfloat16}),      # likewise at order one
    ([1e4, 1.0 + 1e-3], [1e4, 1.0], {"dtype": torch.float32}),  # and in float32
])
def test_wrong_results_fail(actual, expected, kw):
    with pytest.raises(AssertionError):
        assert_close(torch.tensor(actual), torch.tensor(expected), **kw)


def test_reports_shape_mismatch_and_the_worst_element():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3))
    with pytest.raises(AssertionError, match=r"index \[1, 0\]"):
        assert_close(torch.tensor([[1.0, 1.0], [5.0, 1.0]]), torch.ones(2, 2))


def test_norm_check_allows_reordering_but_not_a_wrong_slice():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(4, 64, generator=g, dtype=torch.float64)
    # A near-zero element off by the size of its terms' rounding: element-wise fails, norm-wise passes.
    a = e.clone()
    e[0, 0] = 1e-9
    a[0, 0] = 1e-9 + 1e-4
    with pytest.raises(AssertionError):
        assert_close(a, e, dtype=torch.float32)
    assert_close_norm(a, e, dtype=torch.float32, dim=-1)
    # One wrong row fails on its own, though the whole tensor's norm would hide it.
    b = e.clone()
    b[2, 5] += 1e-3 * e[2].norm()
    assert_close_norm(b, e, rtol=1e-3 / 2 + 1e-4, atol=0.0)
    with pytest.raises(AssertionError, match=r"slice \[2\]"):
        assert_close_norm(b, e, rtol=1e-3 / 2, atol=0.0, dim=-1)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_norm(torch.tensor([NAN, 1.0]), torch.tensor([0.0, 1.0]))
    assert_close_norm(torch.tensor([INF, 1.0]), torch.tensor([INF, 1.0]))
