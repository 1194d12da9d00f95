"""The moment maths on the host: Chan's merge against numpy, empty batches, finiteness."""

from __future__ import annotations

import numpy as np
import pytest

from bnfreeze._moments import Moments


def merged(batches: list[np.ndarray]) -> Moments:
    """Per-channel moments of ``batches`` (rows x channels), merged one batch at a time."""
    total = Moments.empty((batches[0].shape[1],))
    for batch in batches:
        count = np.full(batch.shape[1], float(len(batch)))
        with np.errstate(invalid="ignore"):  # inf - inf; the empty batches' NaN on purpose
            mean = batch.mean(axis=0) if len(batch) else np.full(batch.shape[1], np.nan)
            m2 = ((batch - mean) ** 2).sum(axis=0) if len(batch) else mean
        total.add(count, mean, m2)
    return total


@pytest.mark.parametrize("sizes", [[100], [1, 99], [7] * 14 + [2], [50, 1, 1, 48]])
def test_merge_equals_numpy_over_all_rows(sizes: list[int]) -> None:
    """Any split into batches gives numpy's mean and biased variance of all rows."""
    rows = np.random.default_rng(0).normal(1e3, 2.0, size=(sum(sizes), 3))
    batches = np.split(rows, np.cumsum(sizes)[:-1])
    moments = merged(batches)
    np.testing.assert_allclose(moments.mean, rows.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(moments.variance(), rows.var(axis=0), rtol=1e-10)
    np.testing.assert_array_equal(moments.count, float(sum(sizes)))


def test_empty_batches_are_skipped_exactly() -> None:
    """Batches of zero rows (NaN mean and M2, as the fused kernel gives) change nothing."""
    rows = np.random.default_rng(1).normal(size=(20, 2))
    empty = np.zeros((0, 2))
    plain = merged([rows[:8], rows[8:]])
    with_empty = merged([empty, rows[:8], empty, empty, rows[8:], empty])
    for field in ("count", "mean", "m2"):
        np.testing.assert_array_equal(getattr(with_empty, field), getattr(plain, field))


def test_channel_counted_in_no_batch_has_zero_variance() -> None:
    """A channel that never counted anything keeps mean 0 and variance 0 (not NaN)."""
    moments = Moments.empty((2,))
    moments.add(np.array([3.0, 0.0]), np.array([1.0, np.nan]), np.array([2.0, np.nan]))
    np.testing.assert_array_equal(moments.mean, [1.0, 0.0])
    np.testing.assert_array_equal(moments.variance(), [2.0 / 3.0, 0.0])


@pytest.mark.parametrize(
    ("value", "dtype", "expected"),
    [
        (np.nan, "float32", "mean"),
        (np.inf, "float32", "mean"),
        (1e30, "float32", "variance"),
        (1e30, "float64", None),
        (3.0, "float32", None),
    ],
    ids=["nan", "inf", "overflowing-float32", "fits-float64", "finite"],
)
def test_non_finite_names_the_statistic(value: float, dtype: str, expected: str | None) -> None:
    """A statistic is non-finite when NaN, infinite, or too large for the variable's dtype."""
    moments = merged([np.array([[value], [-1.0]])])
    assert moments.non_finite(np.dtype(dtype)) == expected
