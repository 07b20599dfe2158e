"""Compiled kernels of the schedule phase: the action table and the link budgets.

``actions`` decides, in two passes over the blocks, the candidate actions of ``policy.schedule``
(see its docstring), grouped by kind in the order the numpy code appended them (fetches,
regenerations, transcodes, warm copies, spills, evictions, warm drops; each group by row), since
that order breaks ties later. ``link_budgets`` issues the most urgent transfers of each link
within its byte budget, selecting the few that can fit instead of sorting every candidate.
"""

from __future__ import annotations

import numpy as np

from policy._select import _inline, _jit, _sorted_subset, boundary, order_keys, split_at
from policy.snapshot import CXL, HBM, HOST, NONE, STORAGE

# Action kinds, and priority classes (the values of ``policy.plan.Priority``).
FETCH, REGENERATE, TRANSCODE, WARM_COPY, SPILL, EVICT, DROP_WARM = range(7)
KINDS = 7
DEMAND, IMMINENT, PREFETCH, DEMOTION = range(4)


@_inline
def _hbm_action(
    c: int, t: int, f: int, grows: bool, same_precision: bool, c_full: bool, regenerate: bool
) -> tuple[int, bool]:
    """The HBM action (-1 for none) of a block going from encoding ``c`` to ``t`` with ``f`` in
    flight (``grows``: ``t`` is bigger; ``c_full``: ``c`` is full precision), and whether it
    fetches a smaller copy again (a reduced copy re-quantized in place would compound its
    error). Scalars only: see ``policy._select._inline``."""
    fetch = REGENERATE if regenerate else FETCH
    if c != NONE and t == NONE:
        return EVICT, False
    if c == NONE:
        return (fetch if t != NONE and f != t else -1), False  # noqa: PLR1714 (numba)
    if t == c or f == t:  # noqa: PLR1714 (numba)
        return -1, False
    if grows and not same_precision:
        return fetch, False  # an upgrade
    if c_full or same_precision:
        return TRANSCODE, False
    return fetch, True


@_inline
def _fallback_action(current: int, target: int) -> int:
    if target == current:
        return -1
    if target == HOST or (target == CXL and current == STORAGE):
        return WARM_COPY
    return SPILL if target == CXL else DROP_WARM


@_inline
def _wrap(tier: int, n_tiers: int) -> int:
    return tier + n_tiers if tier < 0 else tier  # as numpy indexing (np.add.at) treats -1


@_jit
def actions(
    hbm_encoding: np.ndarray,
    target_hbm: np.ndarray,
    in_flight: np.ndarray,
    fallback_level: np.ndarray,
    target_fallback: np.ndarray,
    time_to_next_use_s: np.ndarray,
    nbytes: np.ndarray,
    decode_s: np.ndarray,
    regenerable: np.ndarray,
    demand: np.ndarray,
    quality_bound: np.ndarray,
    hbm_tier: np.ndarray,
    host_tier: np.ndarray,
    cxl_tier: np.ndarray,
    precision: np.ndarray,
    full_precision: np.ndarray,
    usable: np.ndarray,
    link_gbps: np.ndarray,
    link_latency_s: np.ndarray,
    regenerate_gbps: float,
    now_s: float,
    imminent_horizon_s: float,
    safety_margin_s: float,
    n_tiers: int,
) -> tuple[np.ndarray, ...]:
    """The action table: per action its block, kind, source and destination levels, encoding,
    class, deadline, bytes on its link (0 for drops), and whether it shrinks a resident copy,
    is an upgrade the veto requires, or is held (it removes the fallback copy a fetch of the
    same block reads this tick); then the blocks whose copy in flight is cancelled, and each
    tier's occupancy during the tick after drops (ready and in-flight copies)."""
    n = len(hbm_encoding)
    hbm_kind = np.full(n, -1, np.int8)
    warm_kind = np.full(n, -1, np.int8)
    refetch = np.zeros(n, np.bool_)
    counts = np.zeros(KINDS, np.int64)
    cancels = 0
    for r in range(n):
        c, t, f = hbm_encoding[r], target_hbm[r], in_flight[r]
        regenerate = regenerable[r] and fallback_level[r] == STORAGE
        grows = nbytes[r, t] > nbytes[r, c]  # (an index of -1 reads a column left unused)
        same = precision[c] == precision[t]
        kind, again = _hbm_action(c, t, f, grows, same, full_precision[c], regenerate)
        if kind >= 0:
            hbm_kind[r] = kind
            refetch[r] = again
            counts[kind] += 1
        kind = _fallback_action(fallback_level[r], target_fallback[r])
        if kind >= 0:
            warm_kind[r] = kind
            counts[kind] += 1
        if f != NONE and f != t:  # noqa: PLR1714 (numba)
            cancels += 1
    starts = np.zeros(KINDS, np.int64)
    for k in range(1, KINDS):
        starts[k] = starts[k - 1] + counts[k - 1]
    total = starts[KINDS - 1] + counts[KINDS - 1]
    block = np.empty(total, np.int64)
    kinds = np.empty(total, np.int8)
    src = np.empty(total, np.int64)
    dst = np.empty(total, np.int64)
    encoding = np.empty(total, np.int64)
    cls = np.empty(total, np.int8)
    deadline = np.empty(total, np.float64)
    size = np.zeros(total, np.int64)
    shrink = np.zeros(total, np.bool_)
    required_up = np.zeros(total, np.bool_)
    held = np.zeros(total, np.bool_)
    cancelled = np.empty(cancels, np.int64)
    occupancy = np.zeros(n_tiers, np.float64)
    cancels = 0
    for r in range(n):
        c, t, f, fc = hbm_encoding[r], target_hbm[r], in_flight[r], fallback_level[r]
        if c != NONE:
            occupancy[hbm_tier[r]] += nbytes[r, c]
        if f != NONE:
            if f != t:
                cancelled[cancels] = r
                cancels += 1
            else:
                occupancy[hbm_tier[r]] += nbytes[r, f]
        if fc == HOST:
            occupancy[_wrap(host_tier[r], n_tiers)] += nbytes[r, 0]
        elif fc == CXL:
            occupancy[_wrap(cxl_tier[r], n_tiers)] += nbytes[r, 0]
        kind = hbm_kind[r]
        t_next = time_to_next_use_s[r]
        if kind >= 0:
            a = starts[kind]
            starts[kind] += 1
            block[a] = r
            kinds[a] = kind
            dst[a] = HBM
            encoding[a] = t
            if kind == EVICT:
                src[a], dst[a], encoding[a] = HBM, NONE, NONE
                cls[a], deadline[a] = DEMOTION, np.inf
                occupancy[hbm_tier[r]] -= nbytes[r, c]
            elif kind == TRANSCODE:
                src[a] = HBM
                making_usable = usable[t] and not usable[c]
                if making_usable:
                    cls[a] = IMMINENT if t_next < imminent_horizon_s else PREFETCH
                    deadline[a] = now_s + t_next - safety_margin_s
                else:
                    cls[a], deadline[a] = DEMOTION, np.inf
            else:
                moved = nbytes[r, t]
                if kind == REGENERATE:
                    src[a] = HBM
                    move_s = moved / (regenerate_gbps * 1e9)
                else:
                    src[a] = fc
                    gbps = link_gbps[fc, HBM]
                    seconds = moved / (gbps * 1e9) if gbps > 0 else np.inf
                    move_s = link_latency_s[fc, HBM] + seconds
                move_s = move_s + decode_s[r, t]
                if demand[r]:
                    cls[a] = DEMAND
                elif refetch[r]:
                    cls[a] = DEMOTION
                elif c == NONE and t_next < imminent_horizon_s:
                    cls[a] = IMMINENT
                else:
                    cls[a] = PREFETCH  # an upgrade of a usable copy is never urgent
                deadline[a] = now_s + t_next - move_s - safety_margin_s
            if kind != EVICT:
                size[a] = nbytes[r, t]
                if c != NONE:
                    shrink[a] = nbytes[r, t] < nbytes[r, c]
                    required_up[a] = not shrink[a] and quality_bound[r]
        kind = warm_kind[r]
        if kind >= 0:
            a = starts[kind]
            starts[kind] += 1
            block[a] = r
            kinds[a] = kind
            src[a] = fc
            encoding[a] = 0 if kind != DROP_WARM else NONE
            deadline[a] = np.inf
            cls[a] = PREFETCH if kind == WARM_COPY else DEMOTION
            dst[a] = target_fallback[r] if kind == WARM_COPY else (CXL if kind == SPILL else NONE)
            held[a] = kind != WARM_COPY and hbm_kind[r] == FETCH
            if kind == DROP_WARM:
                if not held[a]:
                    tier = host_tier[r] if fc == HOST else cxl_tier[r]
                    occupancy[_wrap(tier, n_tiers)] -= nbytes[r, 0]
            else:
                size[a] = nbytes[r, 0]
    return (
        block,
        kinds,
        src,
        dst,
        encoding,
        cls,
        deadline,
        size,
        shrink,
        required_up,
        held,
        cancelled,
        occupancy,
    )


@_jit
def link_budgets(
    src: np.ndarray,
    dst: np.ndarray,
    cls: np.ndarray,
    deadline: np.ndarray,
    size: np.ndarray,
    subset: np.ndarray,
    link_gbps: np.ndarray,
    busy_fraction: np.ndarray,
    tick_s: float,
    demotion_busy_fraction: float,
    now_s: float,
) -> np.ndarray:
    """Mask of the transfers of ``subset`` (ascending action indices) issued this tick: per
    link, in class then deadline order (then index), each gets ``gbps * tick_s`` bytes less
    what transfers in flight already use; a demotion only up to ``demotion_busy_fraction``;
    the first on an idle link always goes."""
    issued = np.zeros(len(src), np.bool_)
    m = len(subset)
    key = np.empty(m, np.float64)  # by position in ``subset``: ties go to the lower index
    for j in range(m):
        a = subset[j]
        ahead = deadline[a] - now_s  # np.clip(ahead, -1e11, 1e11), NaN kept
        if ahead < -1e11:
            ahead = -1e11
        elif ahead > 1e11:
            ahead = 1e11
        key[j] = cls[a] * 1e12 + ahead
    keys = order_keys(key, False)
    ones = np.ones(m)
    first = np.zeros(m, np.bool_)
    for code in range(16):
        source, destination = code // 4, code % 4
        count = 0
        smallest = np.iinfo(np.int64).max
        for a in subset:
            if src[a] == source and dst[a] == destination:
                count += 1
                smallest = min(smallest, size[a])
        capacity = link_gbps[source, destination] * 1e9 * tick_s
        if count == 0 or capacity <= 0:
            continue
        mine = np.empty(count, np.int64)
        count = 0
        for j in range(m):
            if src[subset[j]] == source and dst[subset[j]] == destination:
                mine[count] = j
                count += 1
        # A link takes a few transfers per tick: only as many as could fit are ordered.
        could_fit = int(min(float(count), capacity // max(smallest, 1) + 2))
        if could_fit < count:
            pivot, _ = boundary(keys, keys, False, ones, could_fit - 0.5, mine)
            split_at(keys, keys, False, mine, pivot, first)
            mine = mine[first[mine]]
        mine = _sorted_subset(keys, keys, False, mine)
        busy = busy_fraction[source, destination]
        before = 0.0
        for item in mine:
            a = subset[item]
            moved = float(size[a])
            used = busy + before / capacity
            used_after = busy + (before + moved) / capacity
            limit = demotion_busy_fraction if cls[a] == DEMOTION else 1.0
            first_on_idle = before == 0 and busy < limit
            issued[a] = (used < limit and used_after <= limit) or first_on_idle
            before += moved
    return issued
