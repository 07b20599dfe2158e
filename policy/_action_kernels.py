"""Compiled kernels of the schedule phase: the action table and the link budgets.

``actions`` decides, in two passes over the blocks, the candidate actions of ``policy.schedule``
(see its docstring), grouped by kind in the order the numpy code appended them (fetches,
regenerations, transcodes, warm copies, spills, evictions, warm drops; each group by row), since
that order breaks ties later. ``link_budgets`` issues the most urgent transfers of each link
within its byte budget, selecting the few that can fit instead of sorting every candidate.
"""

from __future__ import annotations

import numpy as np

from policy._select import _MAX as _MAX_KEY
from policy._select import _inline, _jit
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
    decode_rate: np.ndarray,
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
                rate = decode_rate[t]  # policy.static.Static.decode_s, row by row
                move_s = move_s + (float(nbytes[r, 0]) / rate if rate > 0 else 0.0)
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
    kind: np.ndarray,
    fits: np.ndarray,
    only_fits: bool,
    link_gbps: np.ndarray,
    busy_fraction: np.ndarray,
    tick_s: float,
    demotion_busy_fraction: float,
    now_s: float,
) -> np.ndarray:
    """Mask of the transfers issued this tick, among the actions on a link (``kind`` below
    ``EVICT``; those that ``fits`` too when ``only_fits``): per link, in class then deadline
    order (then index), each gets ``gbps * tick_s`` bytes less what transfers in flight already
    use; a demotion only up to ``demotion_busy_fraction``; the first on an idle link always
    goes."""
    issued = np.zeros(len(src), np.bool_)
    m = 0
    for a in range(len(src)):
        m += int(kind[a] < EVICT and (fits[a] or not only_fits))
    subset = np.empty(m, np.int64)
    m = 0
    for a in range(len(src)):
        if kind[a] < EVICT and (fits[a] or not only_fits):
            subset[m] = a
            m += 1
    # Per link (source * 4 + destination): its transfers and the smallest of them.
    count = np.zeros(16, np.int64)
    smallest = np.full(16, np.iinfo(np.int64).max, np.int64)
    for item in subset:
        code = src[item] * 4 + dst[item]
        count[code] += 1
        smallest[code] = min(smallest[code], size[item])
    # A link takes a few transfers per tick: only as many as could fit are ordered, kept in a
    # small sorted buffer per link while the candidates stream past.
    could_fit = np.zeros(16, np.int64)
    capacity = np.zeros(16, np.float64)
    for code in range(16):
        capacity[code] = link_gbps[code // 4, code % 4] * 1e9 * tick_s
        if count[code] and capacity[code] > 0:
            could_fit[code] = int(
                min(float(count[code]), capacity[code] // max(smallest[code], 1) + 2)
            )
    starts = np.zeros(17, np.int64)
    for code in range(16):
        starts[code + 1] = starts[code] + could_fit[code]
    best = np.empty(starts[16], np.int64)  # per link: positions in ``subset``, in order
    best_key = np.empty(starts[16], np.int64)
    held = np.zeros(16, np.int64)
    bits = np.empty(1, np.float64)
    as_int = bits.view(np.int64)
    for j in range(m):
        a = subset[j]
        code = src[a] * 4 + dst[a]
        k = could_fit[code]
        if k == 0:
            continue
        ahead = deadline[a] - now_s  # np.clip(ahead, -1e11, 1e11), NaN kept
        if ahead < -1e11:
            ahead = -1e11
        elif ahead > 1e11:
            ahead = 1e11
        bits[0] = cls[a] * 1e12 + ahead + 0.0
        key = as_int[0]
        if np.isnan(bits[0]):
            key = _MAX_KEY
        elif key < 0:
            key ^= _MAX_KEY
        base = starts[code]
        n_held = held[code]
        if n_held == k and key >= best_key[base + k - 1]:
            continue  # not better than the last kept (ties: the later position loses)
        slot = base + min(n_held, k - 1)
        while slot > base and best_key[slot - 1] > key:
            best_key[slot] = best_key[slot - 1]
            best[slot] = best[slot - 1]
            slot -= 1
        best_key[slot] = key
        best[slot] = j
        held[code] = min(n_held + 1, k)
    for code in range(16):
        if could_fit[code] == 0:
            continue
        busy = busy_fraction[code // 4, code % 4]
        before = 0.0
        for slot in range(starts[code], starts[code] + held[code]):
            a = subset[best[slot]]
            moved = float(size[a])
            used = busy + before / capacity[code]
            used_after = busy + (before + moved) / capacity[code]
            limit = demotion_busy_fraction if cls[a] == DEMOTION else 1.0
            first_on_idle = before == 0 and busy < limit
            issued[a] = (used < limit and used_after <= limit) or first_on_idle
            before += moved
    return issued


@_jit
def resolve(
    kind: np.ndarray,
    issued_on_links: np.ndarray,
    spilled: np.ndarray,
    required_up: np.ndarray,
    held: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """What the tick does: drops need no link; a required upgrade its link cannot carry this
    tick becomes an eviction too (the low-precision copy must not keep serving); held actions
    wait. Returns the mask of actions done, their kinds (spills as evictions), the mask of
    transfers started, and how many transfers wait for a later tick. ``spilled`` is updated in
    place."""
    n = len(kind)
    issued = np.empty(n, np.bool_)
    kinds = kind.copy()
    moving = np.zeros(n, np.bool_)
    deferred = 0
    for a in range(n):
        on_link = kind[a] < EVICT
        done = (not on_link) or issued_on_links[a]
        if required_up[a] and not done and not held[a]:
            spilled[a] = True
        if on_link and not done and not spilled[a]:
            deferred += 1
        done = done or spilled[a]
        if spilled[a]:
            kinds[a] = EVICT  # fetched again, smaller, later
        issued[a] = done and not held[a]
        moving[a] = issued[a] and on_link and not spilled[a]
    return issued, kinds, moving, deferred
