"""Compiled kernels of the schedule phase: capacity admission and the transition records.

``admit`` and ``transitions`` implement ``policy.admission.admit`` and the records of
``policy.schedule`` over the (few) copies a tick can start, without numpy's per-call costs.
"""

from __future__ import annotations

import numpy as np

from policy._link_kernels import EVICT, FETCH, REGENERATE, TRANSCODE
from policy._select import _inline, _jit, order_keys, sorted_distinct, stable_order
from policy.plan import (
    REASON_DEMAND,
    REASON_EVICT,
    REASON_PROMOTE,
    REASON_REGENERATE,
    REASON_SHRINK,
    REASON_UPGRADE,
    REASON_VETO_EVICT,
    REASON_WARM_DOWN,
    REASON_WARM_UP,
)
from policy.snapshot import CXL, HBM, HOST, NONE, STORAGE


@_jit
def _urgency_order(cls: np.ndarray, deadline: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Positions ``0..len(items)`` ordered by their action's class, then deadline (NaN last),
    then position: ``np.lexsort((deadline[items], cls[items]))``."""
    order = stable_order(order_keys(deadline[items], False))
    ordered: np.ndarray = order[stable_order(cls[items[order]].astype(np.int64))]
    return ordered


@_jit
def _fit_prefix(
    fill: np.ndarray,
    tier: np.ndarray,
    fill_size: np.ndarray,
    cls: np.ndarray,
    deadline: np.ndarray,
    occupancy: np.ndarray,
    usable: np.ndarray,
    fits: np.ndarray,
) -> None:
    """Set ``fits[k]`` for the fills ``k`` (``fill[k]`` their action) that, per tier in class
    then deadline order (``np.lexsort((deadline, cls, tier))``), form the longest prefix whose
    sizes fit the tier's room."""
    order = _urgency_order(cls, deadline, fill)
    order = order[stable_order(tier[order])]
    running = 0.0
    last = NONE - 1
    for k in order:
        t = tier[k]
        if t != last:
            running = 0.0
            last = t
        running += float(fill_size[k])
        if t != NONE:
            fits[k] = running <= usable[t] - occupancy[t]


@_jit
def admit(
    block: np.ndarray,
    kind: np.ndarray,
    dst: np.ndarray,
    encoding: np.ndarray,
    cls: np.ndarray,
    deadline: np.ndarray,
    shrink: np.ndarray,
    required_up: np.ndarray,
    held: np.ndarray,
    within_reach: np.ndarray,
    occupancy: np.ndarray,
    usable: np.ndarray,
    hbm_encoding: np.ndarray,
    hbm_tier: np.ndarray,
    host_tier: np.ndarray,
    cxl_tier: np.ndarray,
    nbytes: np.ndarray,
    max_transitions: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Capacity admission: a copy may be started only if its tier holds it alongside everything
    that exists during the tick (``occupancy``: ready copies, copies in flight, the old copy of
    a block being re-encoded, after this tick's drops and cancellations; updated in place). Most
    urgent first; the rest wait, and at most ``max_transitions`` copies start. Only the copies
    ``within_reach`` of their link in a few ticks are considered, and the shrinks and required
    upgrades; ``held`` ones wait. A shrink (a smaller copy of a block in HBM) that finds no
    room, while another copy waits for room in its tier, becomes an eviction instead: the block
    is fetched again, smaller, on a later tick. So does an upgrade the veto requires that finds
    no room: the block must not keep serving below its floor or past the quality budget while
    it waits.

    Returns the mask of actions that fit and the mask of shrinks turned into evictions.
    """
    n = len(block)
    fits = np.zeros(n, np.bool_)
    spilled = np.zeros(n, np.bool_)
    waits = np.empty(n, np.bool_)  # held, or out of its link's reach
    count = 0
    for a in range(n):
        waits[a] = held[a] or not (within_reach[a] or shrink[a] or required_up[a])
        if kind[a] >= EVICT:
            fits[a] = True
        elif not waits[a]:
            count += 1
    fill = np.empty(count, np.int64)
    tier = np.empty(count, np.int64)
    fill_size = np.empty(count, np.int64)
    count = 0
    for a in range(n):
        if kind[a] < EVICT and not waits[a]:
            r = block[a]
            fill[count] = a
            if dst[a] == HBM:
                tier[count] = hbm_tier[r]
                fill_size[count] = nbytes[r, max(encoding[a], 0)]
            else:
                tier[count] = host_tier[r] if dst[a] == HOST else cxl_tier[r]
                fill_size[count] = nbytes[r, 0]
            count += 1
    first = np.zeros(count, np.bool_)
    _fit_prefix(fill, tier, fill_size, cls, deadline, occupancy, usable, first)
    waiting = np.zeros(len(occupancy), np.bool_)  # tiers where a copy waits for room
    for k in range(count):
        if not first[k] and not (shrink[fill[k]] and not held[fill[k]]) and tier[k] != NONE:
            waiting[tier[k]] = True
    spill = np.zeros(count, np.bool_)
    for k in range(count):
        a = fill[k]
        if not first[k]:
            shrinks = shrink[a] and not held[a]
            spill[k] = (shrinks and waiting[hbm_tier[block[a]]]) or required_up[a]
    if spill.any():  # shrinks lacking room become evictions; the waiting copies get the bytes
        for k in range(count):
            r = block[fill[k]]
            if spill[k]:
                spilled[fill[k]] = True
                occupancy[hbm_tier[r]] -= nbytes[r, hbm_encoding[r]]
        for k in range(count):
            if first[k]:
                occupancy[tier[k]] += fill_size[k]
        again = np.flatnonzero(~first & ~spill)
        second = np.zeros(len(again), np.bool_)
        _fit_prefix(
            fill[again], tier[again], fill_size[again], cls, deadline, occupancy, usable, second
        )
        first[again] |= second
    # The cap on copies started per tick, most urgent first.
    admitted = fill[first]
    admitted = admitted[_urgency_order(cls, deadline, admitted)]
    for a in admitted[:max_transitions]:
        fits[a] = True
    return fits, spilled


@_inline
def state_code(
    hbm: int,
    fallback: int,
    in_flight: int,
    regenerable: bool,
    usable: np.ndarray,
    full_precision: np.ndarray,
    codes: np.ndarray,
) -> int:
    """``pool.states.derive_state`` for one block's copies, as an index of ``codes``
    (REGENERABLE, COLD, WARM, HOLDING, PROMOTING, COMPACT, PREMIUM)."""
    has = hbm != NONE
    is_usable = has and usable[hbm]
    full = full_precision[hbm if has else 0]
    state = codes[0] if regenerable else codes[1]
    if fallback == HOST:
        state = codes[2]
    if has and not is_usable:
        state = codes[3]
    if in_flight != NONE:
        state = codes[4]
    if is_usable and not full:
        state = codes[5]
    if is_usable and full:
        state = codes[6]
    return int(state)


@_jit
def transitions(
    block: np.ndarray,
    kind: np.ndarray,
    issued: np.ndarray,
    spilled: np.ndarray,
    cancelled: np.ndarray,
    hbm_encoding: np.ndarray,
    target_hbm: np.ndarray,
    in_flight: np.ndarray,
    fallback_level: np.ndarray,
    target_fallback: np.ndarray,
    regenerable: np.ndarray,
    demand: np.ndarray,
    vetoed_out: np.ndarray,
    nbytes: np.ndarray,
    usable: np.ndarray,
    full_precision: np.ndarray,
    codes: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Transition records for the blocks with an issued action or a cancelled copy: their
    state before and once the tick's issued actions complete, and why (``policy.plan.REASONS``
    indices). Also returns
    which (before, after, through PROMOTING) state pairs occur, for the caller to check
    against ``pool.states.ALLOWED_TRANSITIONS``."""
    count = 0
    for a in range(len(block)):
        if issued[a]:
            count += 1
    touched = np.empty(count + len(cancelled), np.int64)
    count = 0
    for a in range(len(block)):
        if issued[a]:
            touched[count] = block[a]
            count += 1
    touched[count:] = cancelled
    rows = sorted_distinct(touched)
    m = len(rows)
    has = np.zeros((m, EVICT + 1), np.bool_)
    warm_done = np.zeros(m, np.bool_)
    was_spilled = np.zeros(m, np.bool_)
    was_cancelled = np.zeros(m, np.bool_)
    for a in range(len(block)):
        if issued[a]:
            i = np.searchsorted(rows, block[a])
            if kind[a] <= EVICT:
                has[i, kind[a]] = True
            k = kind[a]
            if k != FETCH and k != REGENERATE and k != TRANSCODE and k != EVICT:  # noqa: PLR1714
                warm_done[i] = True
        if spilled[a]:
            was_spilled[np.searchsorted(rows, block[a])] = True
    for r in cancelled:
        was_cancelled[np.searchsorted(rows, r)] = True
    before = np.empty(m, np.int8)
    after = np.empty(m, np.int8)
    via = np.empty(m, np.bool_)
    source_level = np.empty(m, np.int64)
    source_encoding = np.empty(m, np.int64)
    target_level = np.empty(m, np.int64)
    hbm_after = np.empty(m, np.int64)
    fallback_after = np.empty(m, np.int64)
    reason = np.empty(m, np.int64)
    seen = np.zeros((len(codes), len(codes), 2), np.bool_)
    for i in range(m):
        r = rows[i]
        cur, fb = hbm_encoding[r], fallback_level[r]
        hbm_done = has[i, FETCH] or has[i, REGENERATE] or has[i, TRANSCODE] or has[i, EVICT]
        flying = NONE if hbm_done or was_cancelled[i] else in_flight[r]
        hbm = (NONE if was_spilled[i] else target_hbm[r]) if hbm_done else cur
        fallback = target_fallback[r] if warm_done[i] else fb
        state_before = state_code(
            cur, fb, in_flight[r], regenerable[r], usable, full_precision, codes
        )
        state_after = state_code(
            hbm, fallback, flying, regenerable[r], usable, full_precision, codes
        )
        warmer = fallback == HOST or (fallback == CXL and fb == STORAGE)
        why = REASON_WARM_UP if warmer else REASON_WARM_DOWN
        if has[i, EVICT]:
            why = REASON_VETO_EVICT if vetoed_out[r] else REASON_EVICT
        if has[i, TRANSCODE]:
            why = REASON_SHRINK
        if has[i, FETCH]:
            if cur != NONE:
                smaller = nbytes[r, max(hbm, 0)] < nbytes[r, max(cur, 0)]
                why = REASON_SHRINK if smaller else REASON_UPGRADE
            else:
                why = REASON_DEMAND if demand[r] else REASON_PROMOTE
        if has[i, REGENERATE]:
            why = REASON_REGENERATE
        usable_before = state_before == codes[5] or state_before == codes[6]
        through = hbm != NONE and hbm != cur and not usable_before  # noqa: PLR1714 (numba)
        before[i], after[i], via[i] = state_before, state_after, through
        seen[state_before, state_after, np.int64(through)] = True
        source_level[i] = HBM if cur != NONE else fb
        source_encoding[i] = cur
        target_level[i] = HBM if hbm != NONE else fallback
        hbm_after[i] = hbm
        fallback_after[i] = fallback
        reason[i] = why
    return (
        rows,
        before,
        after,
        via,
        source_level,
        source_encoding,
        target_level,
        hbm_after,
        fallback_after,
        reason,
        seen,
    )


@_inline
def _tier_at(
    level: int,
    r: int,
    hbm_tier: np.ndarray,
    host_tier: np.ndarray,
    cxl_tier: np.ndarray,
    storage_tier: int,
) -> int:
    """The tier of row ``r`` at ``level`` (its HBM, host or CXL tier; storage else)."""
    if level == HBM:
        tier: int = hbm_tier[r]
    elif level == HOST:
        tier = host_tier[r]
    elif level == CXL:
        tier = cxl_tier[r]
    else:
        tier = storage_tier
    return tier


@_jit
def transfer_rows(
    moving: np.ndarray,
    block: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    encoding: np.ndarray,
    nbytes: np.ndarray,
    cls: np.ndarray,
    deadline: np.ndarray,
    hbm_tier: np.ndarray,
    host_tier: np.ndarray,
    cxl_tier: np.ndarray,
    storage_tier: int,
) -> tuple[np.ndarray, ...]:
    """The transfers (the actions ``moving``, a mask) by class, then deadline (NaN last), then
    action: ``policy.plan.TransferArrays``'s columns (block, source and destination levels
    and tiers, encoding, bytes, class, deadline).

    PERF: one call for 15 numpy calls (flatnonzero, lexsort, the columns) and two of a kernel
    for the tiers, each costly with its code cold in the step."""
    count = 0
    for a in range(len(moving)):
        count += int(moving[a])
    items = np.empty(count, np.int64)
    count = 0
    for a in range(len(moving)):
        if moving[a]:
            items[count] = a
            count += 1
    ordered = items[_urgency_order(cls, deadline, items)]
    rows, source, destination = block[ordered], src[ordered], dst[ordered]
    source_tier = np.empty(count, np.int64)
    destination_tier = np.empty(count, np.int64)
    for i in range(count):
        source_tier[i] = _tier_at(source[i], rows[i], hbm_tier, host_tier, cxl_tier, storage_tier)
        destination_tier[i] = _tier_at(
            destination[i], rows[i], hbm_tier, host_tier, cxl_tier, storage_tier
        )
    return (
        rows,
        source,
        destination,
        source_tier,
        destination_tier,
        encoding[ordered],
        nbytes[ordered],
        cls[ordered],
        deadline[ordered],
    )
