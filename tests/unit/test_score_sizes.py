"""The score phase's sizes cached in ``Static`` (``policy.static.preferred_nbytes`` and
``least_upgrade_nbytes``) and the precision refinement's shortcut on them: blocks whose least upgrade cannot fit are passed over unread, which must never
change which blocks are upgraded."""

from __future__ import annotations

import numpy as np
import pytest

from policy._score_kernels import refine_precision
from policy.snapshot import NONE
from policy.static import least_upgrade_nbytes, preferred_nbytes


def test_sizes_are_the_preferred_bytes_and_the_least_upgrades() -> None:
    nbytes = np.array([[100, 60, 30], [80, 90, 20], [50, 25, 50]], np.int64)
    preferred_by_level = np.array([[0, 0, 0], [1, 2, 1], [2, 2, 2], [1, 1, 0]], np.int8)
    preferred = preferred_nbytes(nbytes, preferred_by_level)
    assert preferred.tolist() == [[100, 80, 50], [60, 20, 25], [30, 20, 50], [60, 90, 50]]
    assert preferred.flags.c_contiguous
    # Full less each encoding's bytes, at least 0: [0, 40, 70], [0, 0, 60], [0, 25, 0].
    assert least_upgrade_nbytes(nbytes).tolist() == [0, 0, 0]
    assert least_upgrade_nbytes(nbytes[:2]).tolist() == [0, 0, 60]
    assert least_upgrade_nbytes(nbytes[:0]).tolist() == [np.iinfo(np.int64).max] * 3


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("hysteresis", [False, True])
def test_refine_upgrades_what_it_would_without_passing_over_any_block(
    seed: int, hysteresis: bool
) -> None:
    rng = np.random.default_rng(seed)
    n, tiers = int(rng.integers(1, 300)), int(rng.integers(1, 3))
    full = rng.choice([40, 64, 100], n).astype(np.int64)
    nbytes = np.stack([full, full // 2, full // 2, full // 4, full // 5], axis=1)
    hbm = rng.choice([NONE, 0, 1, 2, 3, 4], n).astype(np.int64)
    hbm_tier = rng.integers(0, tiers, n).astype(np.int64)
    held = np.zeros(3, np.int64)
    for r in np.flatnonzero(hbm != NONE):
        held[hbm_tier[r]] += nbytes[r, hbm[r]]
    # Rooms around the upgrades' sizes: none fits, some fit, all fit.
    budget = held + rng.choice([5.0, 20.0, 36.0, 61.0, 80.0, 1e9], 3)
    least = least_upgrade_nbytes(nbytes)
    args = (
        hbm_tier,
        rng.random(n) < 0.1,  # leased
        nbytes,
        rng.random((n, 5)),  # sensitivity
        np.array([0.0, 1e9, 1e9, 2e9, 3e9]),  # decode rates
        rng.random(n),  # use probability
        rng.random(n),  # imminence
        np.arange(tiers, dtype=np.int64),
    )
    rest = (
        budget,
        held,
        8,
        hysteresis,
        rng.random(n),  # used
        rng.choice([NONE, 0, 3], n).astype(np.int64),  # current encoding
        rng.random(n) < 0.1,  # pinned
        rng.integers(1, 4, n).astype(np.int64),  # fallback level
        np.array([0.0, 1e-12, 2e-12, 4e-12]),
    )
    shortcut = hbm.copy()
    upgraded = refine_precision(shortcut, *args, tiers == 1, least, *rest)
    reference = hbm.copy()
    expected = refine_precision(reference, *args, False, np.zeros(5, np.int64), *rest)
    assert upgraded.tolist() == expected.tolist()
    assert np.array_equal(shortcut, reference)
