"""``policy._sum.pairwise_sum`` against numpy's sum, bit for bit: the veto's rounds are decided
by this sum, and the plans were made with numpy's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from policy._sum import pairwise_sum


def _same(expected: float, got: float) -> bool:
    """Equal, NaN to NaN, and with the same sign (``-0.0`` is not ``0.0`` here)."""
    if np.isnan(expected):
        return bool(np.isnan(got))
    return expected == got and np.signbit(expected) == np.signbit(got)


# Each side of numpy's cuts: 8 running sums from 8 items, one block up to 128, halves cut at a
# multiple of 8 beyond; a million is the largest pool the benchmark steps.
_LENGTHS = [0, 1, 7, 8, 9, 15, 16, 127, 128, 129, 136, 255, 256, 257, 1000, 16384, 65537]


@pytest.mark.parametrize("n", [*_LENGTHS, 1_000_003])
@pytest.mark.parametrize("scale", ["normal", "wide", "cancelling"])
def test_the_sum_is_numpys_at_every_cut(n: int, scale: str) -> None:
    rng = np.random.default_rng(n)
    if scale == "normal":
        values = rng.standard_normal(n)
    elif scale == "wide":  # magnitudes from 1e-20 to 1e20: the order of the additions shows
        values = rng.random(n) * 10.0 ** rng.integers(-20, 20, n)
    else:  # large terms that cancel, leaving small ones
        values = rng.standard_normal(n) * 1e12 + rng.random(n) * 1e-3
    assert pairwise_sum(values) == float(np.add.reduce(values))


@pytest.mark.parametrize(
    "values",
    [
        [-0.0],
        [-0.0] * 9,
        [-0.0] * 200,
        [np.nan, 1.0],
        [np.inf, -np.inf],
        [np.inf] * 130,
        [1e308] * 200,
        [-1e308] * 3,
    ],
)
def test_signed_zeros_infinities_and_nans_are_numpys(values: list[float]) -> None:
    array = np.array(values)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = float(np.add.reduce(array))
    assert _same(expected, pairwise_sum(array))


@settings(max_examples=200, deadline=None)
@given(
    arrays(
        np.float64,
        st.integers(0, 3000),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=64),
    )
)
def test_any_array_sums_as_numpy_sums_it(values: np.ndarray) -> None:
    with np.errstate(over="ignore", invalid="ignore"):
        expected = float(np.add.reduce(values))
    assert _same(expected, pairwise_sum(values))
