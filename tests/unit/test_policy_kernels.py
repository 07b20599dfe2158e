"""The control step's compiled kernels against the sorting code they replaced.

The kernels pick greedy prefixes by selection instead of sorting; each test runs the sorting
version (kept here as the reference) on random inputs with ties, NaN, infinities and zero sizes
and asserts identical results. (The whole step was also checked plan for plan, bit for bit,
against the numpy step on 16 synthetic scenarios of 1,000 to 1,000,000 blocks.)
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policy._kernels import stable_argsort
from policy._link_kernels import link_budgets
from policy._observe_kernels import fold_routes, route_choices, sample_pairs
from policy._pcg64 import pcg64_raw, seed_words
from policy._select import sorted_distinct, stable_order
from policy._veto_kernels import budget_choice, fit_rows
from policy.score import take_by_density


def reference_take_by_density(density, nbytes, budget, rounds=8):
    """The numpy greedy of ``policy.score.take_by_density`` before it was compiled."""
    taken = np.zeros(len(density), dtype=bool)
    if nbytes.sum() <= budget:
        taken[:] = True
        return taken
    if budget <= 0:
        return taken
    order = np.flatnonzero(nbytes <= budget)
    order = order[np.argsort(-density[order], kind="stable")]
    left = float(budget)
    for _ in range(rounds):
        order = order[nbytes[order] <= left]
        if not len(order):
            break
        cum = np.cumsum(nbytes[order])
        count = int((cum <= left).sum())
        taken[order[:count]] = True
        left -= float(cum[count - 1]) if count else 0.0
        order = order[count + 1 :]
    return taken


def values(draw, n, distinct):
    """Floats with many ties, some NaN and infinities."""
    pool = [float(x) for x in draw(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=distinct))]
    pool += [np.nan, np.inf, -np.inf, 0.0, -0.0]
    weights = [1.0] * (len(pool) - 5) + [0.05] * 5
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.choice(pool, n, p=np.array(weights) / sum(weights))


@st.composite
def greedy_inputs(draw):
    n = draw(st.integers(0, 400))
    density = values(draw, n, draw(st.integers(1, 60)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    low = draw(st.sampled_from([0, 1]))
    nbytes = rng.integers(low, draw(st.integers(2, 1000)), n).astype(np.int64)
    budget = float(rng.uniform(-10, max(int(nbytes.sum()), 1) * 1.1))
    return density, nbytes, budget, draw(st.integers(1, 9))


@settings(max_examples=300, deadline=None)
@given(greedy_inputs())
def test_take_by_density_is_the_sorting_greedy(inputs) -> None:
    density, nbytes, budget, rounds = inputs
    expected = reference_take_by_density(density, nbytes, budget, rounds)
    np.testing.assert_array_equal(take_by_density(density, nbytes, budget, rounds), expected)


def test_take_by_density_at_scale_with_long_runs_of_ties() -> None:
    rng = np.random.default_rng(5)
    density = np.round(rng.lognormal(size=200_000), 2)  # runs of thousands of equal values
    nbytes = rng.choice([100, 50, 27, 23, 7], 200_000).astype(np.int64) * 1000
    for fraction in (0.001, 0.3, 0.999):
        budget = float(nbytes.sum() * fraction)
        expected = reference_take_by_density(density, nbytes, budget)
        np.testing.assert_array_equal(take_by_density(density, nbytes, budget), expected)


def reference_budget_choice(key, saving, target):
    order = stable_argsort(key)
    count = int(np.searchsorted(np.cumsum(saving[order]), target)) + 1
    chosen = np.zeros(len(key), dtype=bool)
    chosen[order[:count]] = True
    return chosen


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.floats(0, 1.2), st.integers(0, 2**32 - 1))
def test_budget_choice_is_the_sorted_running_sum_or_says_it_cannot_tell(
    n, distinct, share, seed
) -> None:
    rng = np.random.default_rng(seed)
    key = -rng.integers(1, distinct + 1, n) / 7.0  # ties
    saving = rng.exponential(1e-3, n) * rng.integers(0, 2, n)  # zeros too
    target = float(saving.sum() * share)
    chosen, certain = budget_choice(key, saving, target)
    if certain:
        np.testing.assert_array_equal(chosen, reference_budget_choice(key, saving, target))


def test_budget_choice_defers_to_the_sort_when_rounding_could_decide() -> None:
    key = np.array([-3.0, -2.0, -1.0])
    saving = np.array([0.1, 0.2, 0.3])
    exact = float(np.cumsum(saving)[1])  # the target is a running sum itself: a tie
    assert not budget_choice(key, saving, exact)[1]
    chosen, certain = budget_choice(key, saving, exact * 0.9)
    assert certain
    assert chosen.tolist() == [True, True, False]
    assert not budget_choice(key, np.array([0.1, np.nan, 0.3]), 0.2)[1]


def reference_fit(rows, fallback, then, hbm, nbytes, density, room):
    """``policy.veto._fit`` for one tier, as the sorting code did it (``rows`` in the order
    that breaks ties)."""
    sequence = np.lexsort((np.arange(len(rows)), then, -density[rows]))
    fits = np.zeros(len(rows), dtype=bool)
    cum, grown, freed = 0, 0, 0
    for i in sequence:
        extra = int(nbytes[rows[i], fallback[i]] - nbytes[rows[i], hbm[rows[i]]])
        cum += max(extra, 0)
        if cum <= room:
            fits[i] = True
            grown += max(extra, 0)
        else:
            freed += int(nbytes[rows[i], hbm[rows[i]]])
    spare = room - float(grown) + float(freed)
    need = 0
    for i in sequence:
        if not fits[i]:
            need += int(nbytes[rows[i], fallback[i]])
            if need <= spare:
                fits[i] = True
    return np.where(fits, fallback, -1)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200), st.integers(1, 20), st.floats(0, 1.5), st.integers(0, 2**32 - 1))
def test_fit_rows_is_the_ordered_two_round_greedy(n, distinct, share, seed) -> None:
    rng = np.random.default_rng(seed)
    blocks = n + 10
    nbytes = np.sort(rng.integers(1, 100, (blocks, 5)), axis=1)[:, ::-1].astype(np.int64)
    hbm = rng.integers(-1, 5, blocks).astype(np.int64)
    rows = np.flatnonzero(hbm != -1)
    fallback = rng.integers(0, 5, len(rows)).astype(np.int64)
    density = rng.integers(0, distinct, blocks) / 3.0
    then = rng.integers(0, distinct, len(rows)) / 5.0
    used = int(nbytes[rows, hbm[rows]].sum())
    budget = np.array([used * share])
    tier_bytes = np.array([used])
    tier = np.zeros(blocks, np.int64)
    everything = np.ones(len(rows), dtype=bool)
    placed = fit_rows(
        rows, fallback, then, True, hbm, tier, nbytes, density, budget, tier_bytes, everything, True
    )
    room = budget[0] - used
    expected = reference_fit(rows, fallback, then, hbm, nbytes, density, room)
    np.testing.assert_array_equal(placed, expected)
    kept = expected != -1  # the tier's bytes follow the moves
    assert (
        tier_bytes[0] == used - nbytes[rows, hbm[rows]].sum() + nbytes[rows, expected][kept].sum()
    )


def test_link_budgets_issue_the_most_urgent_first_within_the_budget() -> None:
    # One link (storage -> HBM, index 3 -> 0) of 10 bytes a tick; four transfers of 4 bytes.
    gbps = np.zeros((4, 4))
    gbps[3, 0] = 1e-8  # 10 bytes per 1 s tick
    src = np.full(5, 3)
    dst = np.array([0, 0, 0, 0, 1])  # the last goes elsewhere: a link with no bandwidth
    cls = np.array([2, 1, 1, 3, 1], np.int8)
    deadline = np.array([5.0, 9.0, 8.0, 1.0, 0.0])
    size = np.full(5, 4, np.int64)
    kind = np.zeros(5, np.int8)
    fits = np.ones(5, dtype=bool)
    busy = np.zeros((4, 4))
    issued = link_budgets(src, dst, cls, deadline, size, kind, fits, gbps, busy, 1, 0.5, 0)
    # Class first, then deadline: 2 (class 1, t=8), then 1 (class 1, t=9); 0 no longer fits.
    assert issued.tolist() == [False, True, True, False, False]


def reference_link_budgets(src, dst, cls, deadline, nbytes, gbps, busy_fraction, tick_s, busy_cap):
    """``policy.admission.within_link_budgets`` as it was, with a full stable sort per link."""
    issued = np.zeros(len(src), dtype=bool)
    link = src * 4 + dst
    key = cls * 1e12 + np.clip(deadline, -1e11, 1e11)
    for code in np.unique(link).tolist():
        mine = np.flatnonzero(link == code)
        capacity = gbps.reshape(-1)[code] * 1e9 * tick_s
        busy = busy_fraction.reshape(-1)[code]
        if capacity <= 0:
            continue
        mine = mine[np.argsort(key[mine], kind="stable")]
        size = nbytes[mine].astype(np.float64)
        before = np.cumsum(size) - size
        used = busy + before / capacity
        used_after = busy + (before + size) / capacity
        limit = np.where(cls[mine] == 3, busy_cap, 1.0)
        first_on_idle_link = (before == 0) & (busy < limit)
        issued[mine] = ((used < limit) & (used_after <= limit)) | first_on_idle_link
    return issued


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 30), st.integers(0, 2**32 - 1))
def test_link_budgets_are_the_sorted_greedy_per_link(n, distinct, seed) -> None:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 4, n)
    dst = rng.integers(0, 4, n)
    cls = rng.integers(0, 4, n).astype(np.int8)
    deadline = rng.choice([np.inf, -np.inf, np.nan, *range(distinct)], n).astype(np.float64)
    nbytes = rng.integers(1, 50, n).astype(np.int64)
    gbps = rng.choice([0.0, 1e-9, 5e-9, 1e-7], (4, 4))
    busy = rng.choice([0.0, 0.3, 0.7], (4, 4))
    kind = rng.choice([0, 2, 5], n).astype(np.int8)  # 5 (an eviction) is on no link
    fits = rng.random(n) < 0.8
    issued = link_budgets(src, dst, cls, deadline, nbytes, kind, fits, gbps, busy, 1, 0.5, 0)
    on_link = np.flatnonzero((kind < 5) & fits)
    expected = np.zeros(n, dtype=bool)
    expected[on_link] = reference_link_budgets(
        src[on_link],
        dst[on_link],
        cls[on_link],
        deadline[on_link],
        nbytes[on_link],
        gbps,
        busy,
        1.0,
        0.5,
    )
    np.testing.assert_array_equal(issued, expected)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**62), 2**62), max_size=300), st.integers(1, 20))
def test_stable_order_and_sorted_distinct_are_numpys(values, modulo) -> None:
    keys = np.array(values, np.int64) % modulo  # many ties
    np.testing.assert_array_equal(stable_order(keys), np.argsort(keys, kind="stable"))
    np.testing.assert_array_equal(sorted_distinct(keys), np.unique(keys))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 150), st.integers(0, 2**32 - 1))
def test_fit_rows_of_a_selection_is_the_fit_of_the_selected_rows(n, seed) -> None:
    rng = np.random.default_rng(seed)
    blocks = n + 5
    nbytes = np.sort(rng.integers(1, 100, (blocks, 5)), axis=1)[:, ::-1].astype(np.int64)
    hbm = rng.integers(0, 5, blocks).astype(np.int64)
    tier = rng.integers(0, 2, blocks).astype(np.int64)  # two tiers
    rows = np.sort(rng.choice(blocks, n, replace=False)).astype(np.int64)
    fallback = rng.integers(0, 5, n).astype(np.int64)
    density = rng.integers(0, 6, blocks) / 3.0
    then = rng.integers(0, 6, n) / 5.0
    budget = rng.uniform(0, 2, 2) * np.bincount(tier, weights=nbytes[np.arange(blocks), hbm])
    used = np.bincount(tier, weights=nbytes[np.arange(blocks), hbm], minlength=2).astype(np.int64)
    selected = rng.random(n) < 0.6
    args = (hbm, tier, nbytes, density, budget)
    bytes_all, bytes_some = used.copy(), used.copy()
    placed = fit_rows(rows, fallback, then, True, *args, bytes_all, selected, True)
    some = fit_rows(
        rows[selected], fallback[selected], then[selected], True, *args, bytes_some, selected, False
    )
    np.testing.assert_array_equal(placed[selected], some)
    assert (placed[~selected] == -1).all()
    np.testing.assert_array_equal(bytes_all, bytes_some)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([2, 65, 4097, 58_000, 2**20, 15_000_000, 2**31 + 1, 3 * 2**30 + 1, 2**32 - 1]),
    st.sampled_from([1, 64, 4096]),
)
def test_sample_pairs_draws_numpys_sample_from_the_raw_stream(seed, total, budget) -> None:
    # 2**31 + 1 and 3 * 2**30 + 1 pairs: numpy rejects about half, a quarter of its draws.
    expected = np.unique(np.random.default_rng(seed).integers(0, total, budget))
    count = 1
    drawn = False
    while not drawn:  # as learn_coactivation does: more raw numbers when rejections need them
        sample, drawn = sample_pairs(total, budget, np.random.PCG64(seed).random_raw(count))
        count *= 2
    np.testing.assert_array_equal(sample, expected)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.integers(0, 2**16), st.integers(0, 2**63 - 1)),
    st.sampled_from([0, 1, 2, 63, 2080, 70_000]),
)
def test_pcg64_raw_is_numpys_raw_stream(seed, count) -> None:
    np.testing.assert_array_equal(
        seed_words(seed), np.random.SeedSequence(seed).generate_state(4, np.uint64)
    )
    np.testing.assert_array_equal(pcg64_raw(seed, count), np.random.PCG64(seed).random_raw(count))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 400), st.integers(1, 4), st.booleans())
def test_route_choices_are_numpys_distinct_keys_and_fold(seed, n, steps, wide) -> None:
    rng = np.random.default_rng(seed)
    shape = (3, 5, 7)
    predicted = rng.random(shape).reshape(-1) < 0.3
    step = rng.integers(10, 10 + steps, n) * (10**6 if wide else 1)  # wide: sorted, no bitset
    model, layer, expert = (rng.integers(0, s, n).astype(np.int32) for s in shape)
    flat, bounds, *folded = route_choices(step, model, layer, expert, 5, 7, predicted)
    size = predicted.size
    key = np.unique((step - step.min()) * size + (model.astype(np.int64) * 5 + layer) * 7 + expert)
    step_of, expected = np.divmod(key, size)
    np.testing.assert_array_equal(flat, expected)
    np.testing.assert_array_equal(bounds, np.flatnonzero(np.diff(step_of)) + 1)
    for got, want in zip(folded, fold_routes(step_of, expected, 15, 7, predicted), strict=True):
        np.testing.assert_array_equal(got, want)
