"""The veto's compiled kernels against plain numpy references (``policy._veto_*``)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policy._select import order_keys
from policy._veto_budget import budget_choice, choose_fixes, fix_round, sort_keys
from policy._veto_candidates import all_candidates, compact_candidates
from policy._veto_fit import fit_rows
from policy._veto_kernels import veto_entry

NONE = -1


def _pool(rng: np.random.Generator, n: int, tiers: int, distinct: int) -> dict[str, np.ndarray]:
    """Blocks with five encodings (bytes falling with the index), a budget fallback that moves
    to a larger, less sensitive encoding, and proposed HBM encodings (some out of HBM)."""
    nbytes = np.sort(rng.integers(1, 100, (n, 5)), axis=1)[:, ::-1].astype(np.int64)
    sensitivity = np.sort(rng.integers(0, distinct, (n, 5)) / 7.0, axis=1)
    sensitivity[:, 0] = 0.0
    budget_fallback = np.maximum(np.arange(5) - rng.integers(1, 3, (n, 5)), 0).astype(np.int8)
    hbm = rng.integers(-1, 5, n).astype(np.int64)
    return {
        "nbytes": nbytes,
        "sensitivity": sensitivity,
        "budget_fallback": budget_fallback,
        "hbm": hbm,
        "hbm_tier": rng.integers(0, tiers, n).astype(np.int64),
        "p": rng.integers(0, distinct, n) / 5.0,
        "density": rng.integers(0, distinct, n) / 3.0,
        "leased": rng.random(n) < 0.1,
        "resident": rng.integers(-1, 5, n).astype(np.int64),
    }


STICKY = 1.0 / 3.0  # the budget's hysteresis at hysteresis_multiple 2 (1.0 is checked by identity)


def reference_candidates(pool, cost, protected):
    """The quality budget's candidates (built by ``veto_entry``) as numpy: rows, current,
    fallback, saving, order key, bytes at current and fallback encodings."""
    rows = np.flatnonzero((cost > 0) & ~protected)
    current = pool["hbm"][rows]
    better = pool["budget_fallback"][rows, current].astype(np.int64)
    saving = cost[rows] - pool["p"][rows] * pool["sensitivity"][rows, better]
    old = pool["nbytes"][rows, current]
    new = pool["nbytes"][rows, better]
    # A fix to the encoding the block holds already counts STICKY of its extra bytes.
    extra = np.maximum(new - old, 1) * np.where(pool["resident"][rows] == better, STICKY, 1.0)
    key = -(saving / extra)
    return rows, current, better, saving, order_keys(key, False), old, new


def _entry(pool):
    allowed = np.ones((len(pool["hbm"]), 5), dtype=bool)
    return veto_entry(
        pool["leased"],
        pool["resident"],
        pool["hbm"],
        allowed,
        pool["hbm_tier"],
        pool["nbytes"],
        pool["p"],
        pool["sensitivity"],
        pool["budget_fallback"],
        int(pool["hbm_tier"].max()) + 1,
        STICKY,
    )


def _assert_candidates(got, expected) -> None:
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(1, 3), st.integers(2, 30), st.integers(0, 2**32 - 1))
def test_the_entry_finds_the_first_round_candidates(n, tiers, distinct, seed) -> None:
    pool = _pool(np.random.default_rng(seed), n, tiers, distinct)
    *_, protected, bad, _, cost, candidates, total, valid = _entry(pool)
    assert len(bad) == 0  # everything allowed
    expected = reference_candidates(pool, cost, protected)
    _assert_candidates(candidates, expected)
    assert total == sum(expected[3].tolist())  # summed in candidate order
    assert valid == bool(np.all(np.isfinite(expected[3]) & (expected[3] >= 0)))
    again, total_again, _ = all_candidates(
        cost,
        protected,
        pool["hbm"],
        pool["budget_fallback"],
        pool["p"],
        pool["sensitivity"],
        pool["nbytes"],
        pool["resident"],
        STICKY,
    )
    _assert_candidates(again, expected)
    assert total_again == total


def reference_round(pool, candidates, chosen, cost, budget, tier_bytes):
    """A budget round as numpy: the fit (``fit_rows``), then the bookkeeping."""
    rows, current, fallback, _, key, _, _ = candidates
    placed_all = fit_rows(
        rows,
        fallback.astype(np.int64),
        sort_keys(key),
        True,
        pool["hbm"],
        pool["hbm_tier"],
        pool["nbytes"],
        pool["density"],
        budget,
        tier_bytes,
        chosen,
        True,
    )
    fixed = rows[chosen]
    placed = placed_all[chosen]
    cost_before = cost[fixed].copy()
    kept = placed != NONE
    cost[fixed] = 0.0
    cost[fixed[kept]] = pool["p"][fixed[kept]] * pool["sensitivity"][fixed[kept], placed[kept]]
    pool["hbm"][fixed] = placed
    left = -sort_keys(key[~chosen])
    price = max([0.0, *[x for x in left.tolist() if x > 0.0]])
    return fixed, current[chosen].astype(np.int64), placed, cost_before, price


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(1, 3),
    st.integers(2, 30),
    st.floats(0.0, 1.0),
    st.floats(0.3, 1.3),
    st.integers(0, 2**32 - 1),
)
def test_budget_rounds_fix_and_carry_the_candidates_as_recomputed(
    n, tiers, distinct, share, room, seed
) -> None:
    rng = np.random.default_rng(seed)
    pool = _pool(rng, n, tiers, distinct)
    *_, protected, _, tier_bytes, cost, candidates, _, _ = _entry(pool)
    budget = tier_bytes * room
    mirror = {k: v.copy() for k, v in pool.items()}
    mirror_cost, mirror_bytes = cost.copy(), tier_bytes.copy()
    empty = np.empty(0, np.int64)
    records, used = (empty, empty, empty, np.empty(0)), 0  # carried over the rounds, as the veto
    for _ in range(3):
        if not len(candidates[0]):
            break
        chosen = rng.random(len(candidates[0])) < share
        if _ == 0 and share > 0.9:
            chosen[:] = True  # the whole-round path
        expected = reference_round(
            mirror, tuple(a.copy() for a in candidates), chosen, mirror_cost, budget, mirror_bytes
        )
        vetoed = np.zeros(n, dtype=bool)
        bound = np.zeros(n, dtype=bool)
        left = candidates[4][~chosen]
        records, now_used, *rest = fix_round(
            *candidates,
            chosen,
            int(left.min()) if len(left) else 2**63 - 1,
            cost,
            pool["p"],
            pool["sensitivity"],
            pool["budget_fallback"],
            pool["nbytes"],
            pool["hbm"],
            pool["hbm_tier"],
            pool["density"],
            budget,
            tier_bytes,
            vetoed,
            bound,
            pool["resident"],
            STICKY,
            records,
            used,
        )
        got = (*(column[used:now_used] for column in records), *rest)  # this round's records
        used = now_used
        for a, b in zip(got[:4], expected[:4], strict=True):
            np.testing.assert_array_equal(a, b)
        assert got[4] == expected[4]
        np.testing.assert_array_equal(cost, mirror_cost)
        np.testing.assert_array_equal(pool["hbm"], mirror["hbm"])
        np.testing.assert_array_equal(tier_bytes, mirror_bytes)
        np.testing.assert_array_equal(np.flatnonzero(vetoed), got[0][got[2] == NONE])
        np.testing.assert_array_equal(np.flatnonzero(bound), got[0][got[2] != NONE])
        # The candidates carried to the next round are those of the blocks as they now are.
        candidates, total, valid, compacted = got[5:]
        assert chosen.all() or not compacted  # moved up only when every one was chosen
        if not compacted:
            candidates, total, valid = compact_candidates(
                cost,
                pool["hbm"],
                pool["budget_fallback"],
                pool["p"],
                pool["sensitivity"],
                pool["nbytes"],
                pool["resident"],
                STICKY,
                *candidates,
            )
        recomputed = reference_candidates(pool, cost, protected)
        _assert_candidates(candidates, recomputed)
        assert total == sum(recomputed[3].tolist())
        assert valid


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 40), st.floats(0.0, 1.2), st.integers(0, 2**32 - 1))
def test_choose_fixes_is_the_sorted_running_sum_or_says_it_cannot_tell(
    n, distinct, share, seed
) -> None:
    rng = np.random.default_rng(seed)
    key = -rng.integers(0, distinct, n) / 3.0
    saving = rng.integers(0, distinct, n) / 7.0 + rng.random(n) * 1e-3
    target = float(saving.sum() * share)
    total = sum(saving.tolist())
    keys = order_keys(key, False)
    chosen, certain, least = choose_fixes(keys, saving, total, True, target)
    order = np.argsort(key, kind="stable")
    count = int(np.searchsorted(np.cumsum(saving[order]), target)) + 1
    expected = np.zeros(n, dtype=bool)
    expected[order[:count]] = True
    if certain:
        np.testing.assert_array_equal(chosen, expected)
        assert least == (keys[~expected].min() if not expected.all() else 2**63 - 1)
    else:  # only where the target lies within rounding of a running sum, or past them all
        sums = np.concatenate([[0.0], np.cumsum(saving[order])])
        assert target >= total * (1 - 1e-9) or np.isclose(sums, target).any()
    assert budget_choice(key, saving, target)[1] == certain
    assert not choose_fixes(order_keys(key, False), saving, total, False, target)[1]


def test_sort_keys_order_as_the_keys_they_came_from() -> None:
    key = np.array([3.0, -0.0, 0.0, np.nan, -np.inf, 1e-300, -2.5, np.inf, -1e-300])
    back = sort_keys(order_keys(key, False))
    np.testing.assert_array_equal(
        np.argsort(back, kind="stable"), np.argsort(key + 0.0, kind="stable")
    )
    finite = ~np.isnan(key)
    np.testing.assert_array_equal(back[finite], key[finite] + 0.0)
