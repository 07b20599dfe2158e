"""Compiled kernels of the veto (``policy.veto``).

Each greedy choice of the veto walks blocks in a total order and stops where a running sum
passes a limit; the kernels find the stop by weighted selection (``policy._select``) instead of
sorting, with the results of the sorting code they replaced.
"""

from __future__ import annotations

import numpy as np

from policy._select import _jit, boundary, key_bits, mark_before, order_keys
from policy.snapshot import CXL, HOST, NONE

_ROUNDING = 2.0**-52  # twice the unit roundoff of float64


@_jit
def veto_entry(
    leased: np.ndarray,
    hbm_encoding: np.ndarray,
    hbm: np.ndarray,
    allowed: np.ndarray,
    hbm_tier: np.ndarray,
    nbytes: np.ndarray,
    use_probability: np.ndarray,
    sensitivity: np.ndarray,
    n_tiers: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The lease rule, in place: every leased HBM copy the proposal ``hbm`` touched is
    restored. Returns the rows restored and what was proposed for them, the mask of protected
    (leased, resident) blocks, the rows then proposed at an encoding their floor or unknown
    sensitivity forbids, each tier's bytes of proposed HBM copies, and each block's quality
    cost (``quality_costs``)."""
    n = len(hbm)
    protected = np.empty(n, np.bool_)
    tier_bytes = np.zeros(n_tiers, np.int64)
    cost = np.zeros(n)
    # PERF: one pass, into buffers as long as the blocks (memory is only touched where
    # written); a counting pass first read every input twice (a million blocks' captured
    # inputs, alternating on the loaded 2-core machine: 28.0 -> 18.2 ms median).
    rows = np.empty(n, np.int64)
    proposed = np.empty(n, np.int64)
    bad_rows = np.empty(n, np.int64)
    touched = 0
    bad = 0
    for r in range(n):
        protected[r] = leased[r] and hbm_encoding[r] != NONE
        if protected[r] and hbm[r] != hbm_encoding[r]:
            rows[touched] = r
            proposed[touched] = hbm[r]
            hbm[r] = hbm_encoding[r]
            touched += 1
        elif hbm[r] != NONE and not protected[r] and not allowed[r, hbm[r]]:
            bad_rows[bad] = r
            bad += 1
        if hbm[r] != NONE:
            tier_bytes[hbm_tier[r]] += nbytes[r, hbm[r]]
            cost[r] = use_probability[r] * sensitivity[r, hbm[r]]
    rows = rows[:touched].copy()
    proposed = proposed[:touched].copy()
    bad_rows = bad_rows[:bad].copy()
    return rows, proposed, protected, bad_rows, tier_bytes, cost


@_jit
def quality_costs(
    hbm: np.ndarray, use_probability: np.ndarray, sensitivity: np.ndarray
) -> np.ndarray:
    """Per block: ``p(use) * sensitivity`` at its HBM encoding (0 when not in HBM)."""
    cost = np.zeros(len(hbm))
    for r in range(len(hbm)):
        if hbm[r] != NONE:
            cost[r] = use_probability[r] * sensitivity[r, hbm[r]]
    return cost


@_jit
def budget_choice(key: np.ndarray, saving: np.ndarray, target: float) -> tuple[np.ndarray, bool]:
    """The candidates a quality-budget round fixes: in ``key`` order (ties by position), the
    shortest run whose running saving reaches ``target`` (all when none does), as numpy's
    ``searchsorted(cumsum(saving[order]), target) + 1`` picks them.

    The running sum of the sorting code is sequential, in key order; here it is summed in
    another order. Both are within ``(n + 4) * 2**-52 * total`` of the exact sum (savings are
    >= 0), so the choice is certain unless ``target`` lies that close to a partial sum. Returns
    ``(mask, True)`` when certain, ``(empty, False)`` when the caller must sort.
    """
    n = len(key)
    chosen = np.zeros(n, np.bool_)
    total = 0.0
    for i in range(n):
        if not (np.isfinite(saving[i]) and saving[i] >= 0.0):
            return chosen[:0], False
        total += saving[i]
    if not np.isfinite(target):
        return chosen[:0], False
    margin = (n + 4) * _ROUNDING * total
    if total + margin < target:  # every candidate together does not reach it
        chosen[:] = True
        return chosen, True
    keys = order_keys(key, False)
    subset = np.arange(n)
    # The first candidate at which the running saving reaches the target.
    pivot, before = boundary(keys, keys, False, saving, target, subset)
    if pivot < 0:
        return chosen[:0], False
    if not (before + margin < target and before + saving[pivot] - margin > target):
        return chosen[:0], False
    mark_before(keys, keys, False, subset, pivot, chosen)
    chosen[pivot] = True
    return chosen, True


@_jit
def _two_round_fit(
    keys: np.ndarray,
    second: np.ndarray,
    use_secondary: bool,
    grow: np.ndarray,
    new_size: np.ndarray,
    old_size: np.ndarray,
    room: float,
    first: int,
    fits: np.ndarray,
) -> None:
    """Set ``fits`` for the items (in the (keys, second, position) order; ``first`` is the
    first of them) that fit ``room``
    in two greedy rounds: an item fits if its growth and that of every earlier fitting item
    do; the items that do not fit leave, and the bytes they free go, in a second round, to
    the items that did not fit in the first (each then needs its whole new size: its old
    bytes were counted as freed). Each round keeps a prefix of the order, found by selection.
    """
    count = len(keys)
    items = np.arange(count)
    if grow[first] <= room:
        pivot, _ = boundary(keys, second, use_secondary, grow, room, items)
        mark_before(keys, second, use_secondary, items, pivot, fits)
    # PERF: else nothing fits (a full tier: the usual case), known without a selection.
    grown = 0
    freed = 0
    rest = 0
    for j in range(count):
        if fits[j]:
            grown += grow[j]
        else:
            freed += old_size[j]
            items[rest] = j  # in place: ``rest <= j``
            rest += 1
    spare = room - float(grown) + float(freed)
    later = items[:rest]
    pivot, _ = boundary(keys, second, use_secondary, new_size, spare, later)
    mark_before(keys, second, use_secondary, later, pivot, fits)


@_jit
def fit_rows(
    rows: np.ndarray,
    fallback: np.ndarray,
    secondary: np.ndarray,
    use_secondary: bool,
    hbm: np.ndarray,
    hbm_tier: np.ndarray,
    nbytes: np.ndarray,
    chosen_density: np.ndarray,
    budget_bytes: np.ndarray,
    tier_bytes: np.ndarray,
    selected: np.ndarray,
    use_selected: bool,
) -> np.ndarray:
    """The encoding each of ``rows`` (those ``selected``, when used) ends at when moved to
    ``fallback`` where its tier has room (``NONE``: out of HBM, or not selected), most valuable
    first: by ``chosen_density`` descending, then ``secondary`` ascending (when used), then
    position (``_two_round_fit``, per tier). ``tier_bytes`` (HBM bytes per tier) is updated in
    place; ``hbm`` is not."""
    m = len(rows)
    placed = np.full(m, NONE, np.int64)
    # PERF: every tier's count in one pass (a pass per tier, after one finding the tiers).
    counts = np.zeros(len(budget_bytes), np.int64)
    for k in range(m):
        if selected[k] or not use_selected:
            counts[hbm_tier[rows[k]]] += 1
    scratch = np.empty(1)
    bits = scratch.view(np.int64)
    for tier in range(len(budget_bytes)):
        count = counts[tier]
        if count == 0:
            continue
        local = np.empty(count, np.int64)
        keys = np.empty(count, np.int64)
        second = np.zeros(count, np.int64)
        grow = np.empty(count, np.int64)
        new_size = np.empty(count, np.int64)
        old_size = np.empty(count, np.int64)
        j = 0
        first = 0
        for k in range(m):
            row = rows[k]
            if hbm_tier[row] != tier or not (selected[k] or not use_selected):
                continue
            local[j] = k
            keys[j] = key_bits(-chosen_density[row], scratch, bits)
            if use_secondary:
                second[j] = key_bits(secondary[k], scratch, bits)
            new_size[j] = nbytes[row, fallback[k]]
            old_size[j] = nbytes[row, hbm[row]]
            grow[j] = max(new_size[j] - old_size[j], 0)
            if keys[j] < keys[first] or (keys[j] == keys[first] and second[j] < second[first]):
                first = j  # the first in order (ties: the lower position)
            j += 1
        fits = np.zeros(count, np.bool_)
        room = budget_bytes[tier] - float(tier_bytes[tier])
        _two_round_fit(keys, second, use_secondary, grow, new_size, old_size, room, first, fits)
        for j in range(count):
            tier_bytes[tier] -= old_size[j]
            if fits[j]:
                placed[local[j]] = fallback[local[j]]
                tier_bytes[tier] += new_size[j]
    return placed


@_jit
def budget_round(
    contributors: np.ndarray,
    current: np.ndarray,
    fallback: np.ndarray,
    key: np.ndarray,
    chosen: np.ndarray,
    cost: np.ndarray,
    use_probability: np.ndarray,
    sensitivity: np.ndarray,
    hbm: np.ndarray,
    hbm_tier: np.ndarray,
    nbytes: np.ndarray,
    chosen_density: np.ndarray,
    budget_bytes: np.ndarray,
    tier_bytes: np.ndarray,
    vetoed_out: np.ndarray,
    quality_bound: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Fix the ``chosen`` candidates of a quality-budget round: each moves to its less
    sensitive fallback where its tier has room (``fit_rows``: most valuable first, then most
    saved per byte), else out of HBM; targets, flags, costs and ``tier_bytes`` updated in
    place. Returns the rows (ascending), their encodings before, after, their costs before,
    and the round's next price: the most saving per extra byte among the candidates not
    chosen (``-key``; 0 when every candidate is chosen)."""
    placed_all = fit_rows(
        contributors,
        fallback,
        key,
        True,
        hbm,
        hbm_tier,
        nbytes,
        chosen_density,
        budget_bytes,
        tier_bytes,
        chosen,
        True,
    )
    # PERF: buffers as long as the candidates, filled in one pass (a counting pass before).
    rows = np.empty(len(chosen), np.int64)
    before = np.empty(len(chosen), np.int64)
    placed = np.empty(len(chosen), np.int64)
    cost_before = np.empty(len(chosen), np.float64)
    count = 0
    best_left = 0.0  # -key: the saving per extra byte of the first candidate left
    for k in range(len(chosen)):
        if not chosen[k]:
            if -key[k] > best_left:  # noqa: PLR1730 (a NaN key is passed over)
                best_left = -key[k]
            continue
        r = contributors[k]
        rows[count] = r
        before[count] = current[k]
        placed[count] = placed_all[k]
        cost_before[count] = cost[r]
        if placed_all[k] == NONE:
            vetoed_out[r] = True
            cost[r] = 0.0
        else:
            quality_bound[r] = True
            cost[r] = use_probability[r] * sensitivity[r, placed_all[k]]
        hbm[r] = placed_all[k]
        count += 1
    if count == len(chosen):
        return rows, before, placed, cost_before, best_left
    # The plan keeps these records: copies, so that it holds no unused buffer.
    return (
        rows[:count].copy(),
        before[:count].copy(),
        placed[:count].copy(),
        cost_before[:count].copy(),
        best_left,
    )


@_jit
def placement_totals(
    hbm: np.ndarray,
    fallback_level: np.ndarray,
    hbm_tier: np.ndarray,
    host_tier: np.ndarray,
    cxl_tier: np.ndarray,
    nbytes: np.ndarray,
    n_tiers: int,
    preferred: np.ndarray,
    sensitivity: np.ndarray,
    allowed: np.ndarray,
    budget_fallback: np.ndarray,
    headroom: float,
    price: float,
    exhausted: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tier: bytes of the target HBM copies, and of the target warm (host or CXL) copies;
    and per block, the encoding a demand promotion would take now (``policy.plan.Plan``'s
    ``demand_encoding``, defined there; int8): the target where ``hbm`` has one; else, when
    ``exhausted``, the least sensitive allowed encoding (fewest bytes, then lowest index, among
    equals); else ``preferred``, moved down ``budget_fallback`` while its sensitivity passes
    ``headroom`` and the move saves at least ``price`` per extra byte.

    PERF: one pass for both (a million blocks' captured inputs: totals 8.5 ms, demand 9 ms
    apart, 11.8 ms together: the rows of ``nbytes`` are read once).
    """
    hbm_bytes = np.zeros(n_tiers, np.int64)
    warm_bytes = np.zeros(n_tiers, np.int64)
    n, n_encodings = nbytes.shape
    demand = np.empty(n, np.int8)
    for r in range(n):
        e = hbm[r]
        if e != NONE:
            hbm_bytes[hbm_tier[r]] += nbytes[r, e]
        elif exhausted:
            e = 0  # full precision: always allowed
            for c in range(1, n_encodings):
                if not allowed[r, c]:
                    continue
                s, least = sensitivity[r, c], sensitivity[r, e]
                if s < least or (s == least and nbytes[r, c] < nbytes[r, e]):
                    e = c
        else:
            e = preferred[r]
            for _ in range(n_encodings):
                s = sensitivity[r, e]
                if s <= headroom:
                    break
                f = budget_fallback[r, e]
                saved = s - sensitivity[r, f]
                if not saved > 0.0:
                    break
                if saved / max(nbytes[r, f] - nbytes[r, e], 1) < price:
                    break  # the veto would fix other blocks, at its price, before this one
                e = f
        demand[r] = e
        level = fallback_level[r]
        if level == HOST:
            warm_bytes[host_tier[r]] += nbytes[r, 0]
        elif level == CXL:
            warm_bytes[cxl_tier[r]] += nbytes[r, 0]
    return hbm_bytes, warm_bytes, demand
