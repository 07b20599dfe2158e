"""Compiled two-round fit of the veto: which moved blocks keep an HBM copy, and the grouping of
the moved blocks by tier that it starts from.

A veto rule moves blocks to another encoding; in each HBM tier the moved blocks are taken most
valuable first (``chosen_density`` descending, then a second key ascending when used, then
position) in two greedy rounds (``fit_tier``). The callers (``fit_rows`` here, for
rule 2, ``policy._veto_budget.fix_round`` for rule 3) group their items by tier, contiguous
and in position order within a tier, and track each tier's first few items in the order while
they do (``track_first``), so that a full tier (the usual case: nothing, or one block, fits the
first round) needs no selection pass for its first round.
"""

from __future__ import annotations

import numpy as np

from policy._select import (
    _MAX,
    _inline,
    _jit,
    _less,
    boundary,
    key_bits,
    mark_before,
    range_boundary,
)
from policy.snapshot import NONE

FIRST = 8  # items per tier tracked in order while grouping


@_inline
def _precedes(a: int, b: int, keys: np.ndarray, second: np.ndarray, use_secondary: bool) -> bool:
    """Item ``a`` before item ``b`` in the (keys, second, position) order."""
    if keys[a] != keys[b]:
        return bool(keys[a] < keys[b])
    if use_secondary and second[a] != second[b]:
        return bool(second[a] < second[b])
    return a < b


@_inline
def track_first(
    tier: int,
    j: int,
    keys: np.ndarray,
    second: np.ndarray,
    use_secondary: bool,
    first: np.ndarray,
    first_count: np.ndarray,
) -> None:
    """Keep ``first[tier, :first_count[tier]]`` the first items of ``tier`` in the order, given
    item ``j`` (each tier's items come in ascending positions). At most ``FIRST`` moves an item.

    PERF: callers first test ``passes_last`` (scalars only): a call with arrays costs about
    50 ns in reference counts, 50 ms a million items."""
    count = first_count[tier]
    if count == FIRST:
        if not _precedes(j, first[tier, FIRST - 1], keys, second, use_secondary):
            return
        count -= 1
    i = count
    while i > 0 and _precedes(j, first[tier, i - 1], keys, second, use_secondary):
        first[tier, i] = first[tier, i - 1]
        i -= 1
    first[tier, i] = j
    first_count[tier] = count + 1


@_inline
def passes_last(
    count: int, key: int, then: int, j: int, last_key: int, last_then: int, last: int
) -> bool:
    """Whether item ``j`` (``key``, ``then``) belongs among a tier's first items tracked so
    far: fewer than ``FIRST`` are, or it comes before the last of them (``last_*``)."""
    return count < FIRST or _less(key, then, j, last_key, last_then, last)


@_inline
def fits_after(
    fitted: bool, key: int, then: int, j: int, pivot_key: int, pivot_then: int, pivot: int
) -> bool:
    """Whether item ``j`` (``key``, ``then``; ``fitted``: it fit the first round) fits, given
    the second round's ``pivot`` (its keys ``pivot_*``) from ``fit_tier``. Scalars only."""
    return fitted or pivot < 0 or _less(key, then, j, pivot_key, pivot_then, pivot)


@_jit
def fit_tier(
    keys: np.ndarray,
    second: np.ndarray,
    use_secondary: bool,
    new_size: np.ndarray,
    old_size: np.ndarray,
    start: int,
    end: int,
    room: float,
    first: np.ndarray,
    first_count: int,
    least_grow: int,
    total_old: int,
    fits: np.ndarray,
) -> int:
    """Find the items ``start:end`` of one tier that fit ``room``, in two greedy
    rounds over the (keys, second, position) order: an item fits if its growth (new size less
    old, at least 0) and that of every earlier fitting item do; the items that do not fit leave,
    and the bytes they free (``total_old`` is the old bytes of all the items) go, in a second
    round, to the items that did not fit in the first (each then needs its whole new size).
    Each round keeps a prefix of the order. ``first[:first_count]`` are the first items in the
    order (all of them, or ``FIRST``) and ``least_grow`` the least growth of any item: when the
    first round ends within them, no selection is made for it. ``new_size`` is restored before
    returning. ``fits`` (all False on entry) marks the items that fit the first round; returns
    the first item of the second round that does not fit (-1: none): item ``j`` fits when
    ``fits_after(fits, j, ...)``, and an item of the second round fits when every earlier item
    in the order fits."""
    count = end - start
    before = 0.0
    grown = 0
    fit_old = 0
    fitted = 0
    decided = False
    for i in range(first_count):
        j = first[i]
        grow = max(new_size[j] - old_size[j], 0)
        if not before + grow <= room:
            decided = True
            break
        fits[j] = True
        before += grow
        grown += grow
        fit_old += old_size[j]
        fitted += 1
    if not decided:
        # Every tracked item fits: the round ends there only if none of the others can.
        decided = first_count == count or not before + least_grow <= room
    # The second round runs over every item, those that fit the first weighing nothing: they
    # come first in the order, so the prefix it finds is the one of the items left.
    if decided:
        weight = new_size
        held = np.empty(fitted, np.int64)
        for i in range(fitted):
            held[i] = new_size[first[i]]
            new_size[first[i]] = 0
    else:
        grow_all = np.empty(len(new_size), np.int64)
        for j in range(start, end):
            grow_all[j] = max(new_size[j] - old_size[j], 0)
        items = np.arange(start, end)
        pivot, _ = boundary(keys, second, use_secondary, grow_all, room, items)
        mark_before(keys, second, use_secondary, items, pivot, fits)
        grown = 0
        fit_old = 0
        weight = np.empty(len(new_size), np.int64)
        for j in range(start, end):
            weight[j] = 0 if fits[j] else new_size[j]
            if fits[j]:
                grown += grow_all[j]
                fit_old += old_size[j]
    spare = room - float(grown) + float(total_old - fit_old)
    pivot, _ = range_boundary(keys, second, use_secondary, weight, spare, start, end)
    if decided:
        for i in range(fitted):
            new_size[first[i]] = held[i]
    return pivot


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
    position (``fit_tier``, per tier). ``tier_bytes`` (HBM bytes per tier) is updated in
    place; ``hbm`` is not."""
    m = len(rows)
    n_tiers = len(budget_bytes)
    tier_of = np.full(m, -1, np.int64)
    starts = np.zeros(n_tiers + 1, np.int64)
    for k in range(m):
        if not use_selected or selected[k]:
            tier_of[k] = hbm_tier[rows[k]]
            starts[tier_of[k] + 1] += 1
    starts = np.cumsum(starts)
    total = starts[n_tiers]
    local = np.empty(total, np.int64)
    keys = np.empty(total, np.int64)
    second = np.zeros(total, np.int64)
    new_size = np.empty(total, np.int64)
    old_size = np.empty(total, np.int64)
    first = np.zeros((n_tiers, FIRST), np.int64)
    first_count = np.zeros(n_tiers, np.int64)
    least_grow = np.full(n_tiers, np.iinfo(np.int64).max, np.int64)
    total_old = np.zeros(n_tiers, np.int64)
    fill = starts[:n_tiers].copy()
    scratch = np.empty(1)
    bits = scratch.view(np.int64)
    for k in range(m):
        tier = tier_of[k]
        if tier < 0:
            continue
        row = rows[k]
        j = fill[tier]
        fill[tier] += 1
        local[j] = k
        keys[j] = key_bits(-chosen_density[row], scratch, bits)
        if use_secondary:
            second[j] = key_bits(secondary[k], scratch, bits)
        new_size[j] = nbytes[row, fallback[k]]
        old_size[j] = nbytes[row, hbm[row]]
        least_grow[tier] = min(least_grow[tier], max(new_size[j] - old_size[j], 0))
        total_old[tier] += old_size[j]
        last = first[tier, FIRST - 1]
        if passes_last(first_count[tier], keys[j], second[j], j, keys[last], second[last], last):
            track_first(tier, j, keys, second, use_secondary, first, first_count)
    placed = np.full(m, NONE, np.int64)
    fits = np.zeros(total, np.bool_)
    for tier in range(n_tiers):
        start, end = starts[tier], starts[tier + 1]
        if start == end:
            continue
        room = budget_bytes[tier] - float(tier_bytes[tier])
        pivot = fit_tier(
            keys, second, use_secondary, new_size, old_size, start, end, room,
            first[tier], first_count[tier], least_grow[tier], total_old[tier], fits,
        )  # fmt: skip
        pivot_key, pivot_then = (keys[pivot], second[pivot]) if pivot >= 0 else (0, 0)
        for j in range(start, end):
            tier_bytes[tier] -= old_size[j]
            if fits_after(fits[j], keys[j], second[j], j, pivot_key, pivot_then, pivot):
                placed[local[j]] = fallback[local[j]]
                tier_bytes[tier] += new_size[j]
    return placed


@_jit
def whole_tier(
    chosen: np.ndarray,
    rows: np.ndarray,
    hbm_tier: np.ndarray,
    chosen_density: np.ndarray,
    order_key: np.ndarray,
    old_bytes: np.ndarray,
    new_bytes: np.ndarray,
    keys: np.ndarray,
    first: np.ndarray,
    first_count: np.ndarray,
    least_grow: np.ndarray,
    total_old: np.ndarray,
) -> bool:
    """Whether every candidate is ``chosen`` and in one tier (a round's ``whole`` case); if
    so, each candidate's key (minus its ``chosen_density``) and its tier's first items, least
    growth and old bytes, as ``group_chosen`` finds them for grouped items.

    PERF: this and ``group_chosen`` are kernels of their own; written inside
    ``policy._veto_budget.fix_round``, the compiled round took 0.55 ms instead of 0.2 ms
    at 16,384 blocks (where the whole case is not taken)."""
    m = len(rows)
    for k in range(m):
        if not chosen[k]:
            return False
    if m == 0:
        return False
    tier = hbm_tier[rows[0]]
    scratch = np.empty(1)
    bits = scratch.view(np.int64)
    # PERF: the tier's sums in registers, stored once (a sum kept in the array is a chain of
    # stores and loads, one an item): a million blocks' captured round, alternating with the
    # array sums (load 2-3): 11.3 -> 6.7 ms.
    least = _MAX
    old_total = 0
    for k in range(m):
        if hbm_tier[rows[k]] != tier:
            first_count[tier] = 0
            return False
        keys[k] = key_bits(-chosen_density[rows[k]], scratch, bits)
        least = min(least, max(new_bytes[k] - old_bytes[k], 0))
        old_total += old_bytes[k]
        last = first[tier, FIRST - 1]
        if passes_last(
            first_count[tier], keys[k], order_key[k], k, keys[last], order_key[last], last
        ):
            track_first(tier, k, keys, order_key, True, first, first_count)
    least_grow[tier] = least
    total_old[tier] = old_total
    return True


@_jit
def group_chosen(
    chosen: np.ndarray,
    rows: np.ndarray,
    hbm_tier: np.ndarray,
    chosen_density: np.ndarray,
    order_key: np.ndarray,
    old_bytes: np.ndarray,
    new_bytes: np.ndarray,
    keys: np.ndarray,
    first: np.ndarray,
    first_count: np.ndarray,
    least_grow: np.ndarray,
    total_old: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``chosen`` candidates grouped by tier, as ``fix_round`` fits them: each tier's
    start, then per grouped item its candidate, its record (its rank among the chosen), order
    key, and bytes at the fallback and current encodings; ``keys`` (minus the density) and each
    tier's first items, least growth and old bytes filled in."""
    m = len(rows)
    n_tiers = len(first_count)
    scratch = np.empty(1)
    bits = scratch.view(np.int64)
    starts = np.zeros(n_tiers + 1, np.int64)
    # PERF: branch-free (chosen candidates lie at random positions and mispredict).
    picked = np.empty(m, np.int64)
    total = 0
    for k in range(m):
        picked[total] = k
        total += int(chosen[k])
    # PERF: the tiers counted over the chosen only (in the pass above, the count kept in the
    # array was a chain of stores and loads, one a candidate): captured inputs, alternating,
    # 16,384 blocks 0.097 -> 0.076 ms, a million blocks' second round 2.8 -> 1.5 ms.
    for count in range(total):
        starts[hbm_tier[rows[picked[count]]] + 1] += 1
    starts = np.cumsum(starts)
    local = np.empty(total, np.int64)
    ordinal = np.empty(total, np.int64)
    second = np.empty(total, np.int64)
    new_size = np.empty(total, np.int64)
    old_size = np.empty(total, np.int64)
    fill = starts[:n_tiers].copy()
    for count in range(total):
        k = picked[count]
        tier = hbm_tier[rows[k]]
        j = fill[tier]
        fill[tier] += 1
        keys[j] = key_bits(-chosen_density[rows[k]], scratch, bits)
        local[j] = k
        ordinal[j] = count
        second[j] = order_key[k]
        new_size[j] = new_bytes[k]
        old_size[j] = old_bytes[k]
        least_grow[tier] = min(least_grow[tier], max(new_size[j] - old_size[j], 0))
        total_old[tier] += old_size[j]
        last = first[tier, FIRST - 1]
        if passes_last(first_count[tier], keys[j], second[j], j, keys[last], second[last], last):
            track_first(tier, j, keys, second, True, first, first_count)
    return starts, local, ordinal, second, new_size, old_size
