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
from policy._select import _inline, _jit, key_bits, sorted_distinct, stable_order
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


@_inline
def _fields(
    kind: int,
    c: int,
    t: int,
    fc: int,
    ft: int,
    refetch: bool,
    fetched: bool,
    demand: bool,
    quality_bound: bool,
    t_next: float,
    full_bytes: int,
    current_bytes: int,
    target_bytes: int,
    decode_rate: float,
    usable_now: bool,
    usable_then: bool,
    gbps: float,
    latency_s: float,
    regenerate_gbps: float,
    now_s: float,
    imminent_horizon_s: float,
    safety_margin_s: float,
) -> tuple[int, int, int, int, float, int, bool, bool, bool]:
    """One action of a block (encodings ``c`` -> ``t`` in HBM, of ``current_bytes`` and
    ``target_bytes``; fallback ``fc`` -> ``ft``): its source and destination levels,
    encoding, class, deadline, bytes on its link (0 for a drop), and whether it shrinks a
    resident copy, is an upgrade the veto requires (``quality_bound``), or is held (it removes
    the fallback copy a fetch of the same block, ``fetched``, reads this tick). ``gbps`` and
    ``latency_s`` are those of the link from ``fc`` to HBM, ``decode_rate`` that of ``t``.
    Scalars only: see ``policy._select._inline``."""
    if kind == EVICT:
        return HBM, NONE, NONE, DEMOTION, np.inf, 0, False, False, False
    if kind >= WARM_COPY:
        held = kind != WARM_COPY and fetched
        if kind == DROP_WARM:
            return fc, NONE, NONE, DEMOTION, np.inf, 0, False, False, held
        dst = ft if kind == WARM_COPY else CXL
        cls = PREFETCH if kind == WARM_COPY else DEMOTION
        return fc, dst, 0, cls, np.inf, full_bytes, False, False, held
    shrink = c != NONE and target_bytes < current_bytes
    required_up = c != NONE and not shrink and quality_bound
    if kind == TRANSCODE:
        if usable_then and not usable_now:  # making it usable
            cls = IMMINENT if t_next < imminent_horizon_s else PREFETCH
            deadline = now_s + t_next - safety_margin_s
        else:
            cls, deadline = DEMOTION, np.inf
        return HBM, HBM, t, cls, deadline, target_bytes, shrink, required_up, False
    if kind == REGENERATE:
        src = HBM
        move_s = target_bytes / (regenerate_gbps * 1e9)
    else:
        src = fc
        seconds = target_bytes / (gbps * 1e9) if gbps > 0 else np.inf
        move_s = latency_s + seconds
    # policy.static.Static.decode_s, row by row
    move_s = move_s + (float(full_bytes) / decode_rate if decode_rate > 0 else 0.0)
    if demand:
        cls = DEMAND
    elif refetch:
        cls = DEMOTION
    elif c == NONE and t_next < imminent_horizon_s:
        cls = IMMINENT
    else:
        cls = PREFETCH  # an upgrade of a usable copy is never urgent
    deadline = now_s + t_next - move_s - safety_margin_s
    return src, HBM, t, cls, deadline, target_bytes, shrink, required_up, False


@_jit
def _described(
    kind: int,
    r: int,
    hbm_encoding: np.ndarray,
    target_hbm: np.ndarray,
    fallback_level: np.ndarray,
    target_fallback: np.ndarray,
    refetch: np.ndarray,
    hbm_kind: np.ndarray,
    demand: np.ndarray,
    quality_bound: np.ndarray,
    time_to_next_use_s: np.ndarray,
    nbytes: np.ndarray,
    decode_rate: np.ndarray,
    usable: np.ndarray,
    link_gbps: np.ndarray,
    link_latency_s: np.ndarray,
    regenerate_gbps: float,
    now_s: float,
    imminent_horizon_s: float,
    safety_margin_s: float,
) -> tuple[int, int, int, int, float, int, bool, bool, bool]:
    """``_fields`` of action ``kind`` of row ``r``, read from the arrays (for the few actions
    described after the pass over every block)."""
    c, t, fc = hbm_encoding[r], target_hbm[r], fallback_level[r]
    return _fields(
        kind,
        c,
        t,
        fc,
        target_fallback[r],
        refetch[r],
        hbm_kind[r] == FETCH,
        demand[r],
        quality_bound[r],
        time_to_next_use_s[r],
        nbytes[r, 0],
        nbytes[r, c],
        nbytes[r, t],
        decode_rate[t],
        usable[c],
        usable[t],
        link_gbps[fc, HBM],
        link_latency_s[fc, HBM],
        regenerate_gbps,
        now_s,
        imminent_horizon_s,
        safety_margin_s,
    )


@_inline
def _link_of(kind: int, fc: int, ft: int) -> int:
    """Link code (source * 4 + destination) of an action on a link."""
    if kind == FETCH:
        return fc * 4 + HBM
    if kind == WARM_COPY:
        return fc * 4 + ft
    if kind == SPILL:
        return fc * 4 + CXL
    return HBM * 4 + HBM  # regeneration, transcode


@_inline
def _urgency_key(
    cls: int, deadline: float, now_s: float, scratch: np.ndarray, bits: np.ndarray
) -> int:
    """Order key of a transfer on its link: class first, then deadline (seconds from now,
    clipped), as ``order_keys`` maps ``cls * 1e12 + clip(deadline - now)``."""
    ahead = deadline - now_s  # np.clip(ahead, -1e11, 1e11), NaN kept
    if ahead < -1e11:
        ahead = -1e11
    elif ahead > 1e11:
        ahead = 1e11
    return key_bits(cls * 1e12 + ahead, scratch, bits)


@_inline
def _kind_of(a: int, group_start: np.ndarray) -> int:
    """The kind of action ``a`` (actions are grouped by kind)."""
    kind = 0
    while a >= group_start[kind + 1]:
        kind += 1
    return kind


@_inline
def _heap_greater(key: int, a: int, other_key: int, other_a: int) -> bool:
    return key > other_key or (key == other_key and a > other_a)


@_inline
def _keep_smallest(
    heap_key: np.ndarray,
    heap_item: np.ndarray,
    base: int,
    size: int,
    capacity: int,
    key: int,
    item: int,
) -> int:
    """Offer ``(key, item)`` to the max-heap ``[base, base + size)`` that keeps the
    ``capacity`` smallest; returns its new size."""
    if size == capacity:
        if not _heap_greater(heap_key[base], heap_item[base], key, item):
            return size  # not smaller than the largest kept
        i = 0  # replace the root, sift down
        while True:
            child = 2 * i + 1
            if child >= size:
                break
            if child + 1 < size and _heap_greater(
                heap_key[base + child + 1],
                heap_item[base + child + 1],
                heap_key[base + child],
                heap_item[base + child],
            ):
                child += 1
            if not _heap_greater(heap_key[base + child], heap_item[base + child], key, item):
                break
            heap_key[base + i] = heap_key[base + child]
            heap_item[base + i] = heap_item[base + child]
            i = child
        heap_key[base + i] = key
        heap_item[base + i] = item
        return size
    i = size  # append, sift up
    while i > 0:
        parent = (i - 1) // 2
        if not _heap_greater(key, item, heap_key[base + parent], heap_item[base + parent]):
            break
        heap_key[base + i] = heap_key[base + parent]
        heap_item[base + i] = heap_item[base + parent]
        i = parent
    heap_key[base + i] = key
    heap_item[base + i] = item
    return size + 1


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
    busy_fraction: np.ndarray,
    regenerate_gbps: float,
    now_s: float,
    imminent_horizon_s: float,
    safety_margin_s: float,
    reach_s: float,
    demotion_busy_fraction: float,
    n_tiers: int,
) -> tuple[np.ndarray, ...]:
    """The candidate actions that can matter this tick, in the order of the full action table
    (fetches, regenerations, transcodes, warm copies, spills, evictions, warm drops; each by
    row): every drop, every shrink or upgrade of a resident copy, and every transfer its link
    could carry within ``reach_s`` (``link_budgets`` over all of them). Per action: its block,
    kind, source and destination levels, encoding, class, deadline, bytes on its link (0 for a
    drop), whether it shrinks a resident copy, is an upgrade the veto requires, is held, and is
    within reach. Also returns the blocks whose copy in flight is cancelled, each tier's
    occupancy during the tick after drops (ready and in-flight copies), and how many transfers
    were left out (they wait for a later tick).

    PERF: the full table (a row per differing block: a million at a million blocks) is never
    built; the transfers that could be within reach are kept per link in a small heap as the
    blocks stream past, and only the kept actions are described.
    """
    n = len(hbm_encoding)
    hbm_kind = np.full(n, -1, np.int8)
    warm_kind = np.full(n, -1, np.int8)
    refetch = np.zeros(n, np.bool_)
    counts = np.zeros(KINDS, np.int64)
    on_links = np.zeros(16, np.int64)
    smallest = np.full(16, np.iinfo(np.int64).max, np.int64)
    must = 0  # drops, and shrinks or upgrades of resident copies
    cancels = 0
    for r in range(n):
        c, t, f = hbm_encoding[r], target_hbm[r], in_flight[r]
        fc, ft = fallback_level[r], target_fallback[r]
        regenerate = regenerable[r] and fc == STORAGE
        grows = nbytes[r, t] > nbytes[r, c]  # (an index of -1 reads a column left unused)
        same = precision[c] == precision[t]
        kind, again = _hbm_action(c, t, f, grows, same, full_precision[c], regenerate)
        if kind >= 0:
            hbm_kind[r] = kind
            refetch[r] = again
            counts[kind] += 1
            if kind == EVICT:
                must += 1
            else:
                code = _link_of(kind, fc, ft)
                on_links[code] += 1
                smallest[code] = min(smallest[code], nbytes[r, t])
                must += int(c != NONE)
        kind = _fallback_action(fc, ft)
        if kind >= 0:
            warm_kind[r] = kind
            counts[kind] += 1
            if kind == DROP_WARM:
                must += 1
            else:
                code = _link_of(kind, fc, ft)
                on_links[code] += 1
                smallest[code] = min(smallest[code], nbytes[r, 0])
        if f != NONE and f != t:  # noqa: PLR1714 (numba)
            cancels += 1
    # Per link, room for as many transfers as could fit within reach.
    could_fit = np.zeros(16, np.int64)
    capacity = np.zeros(16, np.float64)
    for code in range(16):
        capacity[code] = link_gbps[code // 4, code % 4] * 1e9 * reach_s
        if on_links[code] and capacity[code] > 0:
            could_fit[code] = int(
                min(float(on_links[code]), capacity[code] // max(smallest[code], 1) + 2)
            )
    heap_start = np.zeros(17, np.int64)
    for code in range(16):
        heap_start[code + 1] = heap_start[code] + could_fit[code]
    heap_key = np.empty(heap_start[16], np.int64)
    heap_item = np.empty(heap_start[16], np.int64)  # action index * n + row
    heap_size = np.zeros(16, np.int64)
    group_start = np.zeros(KINDS + 1, np.int64)
    for k in range(KINDS):
        group_start[k + 1] = group_start[k] + counts[k]
    next_index = group_start[:KINDS].copy()
    kept = np.empty(must, np.int64)  # action index * n + row
    cancelled = np.empty(cancels, np.int64)
    occupancy = np.zeros(n_tiers, np.float64)
    scratch = np.empty(1)
    bits = scratch.view(np.int64)
    must = 0
    cancels = 0
    for r in range(n):
        c, t, f, fc = hbm_encoding[r], target_hbm[r], in_flight[r], fallback_level[r]
        ft = target_fallback[r]
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
        for kind in (hbm_kind[r], warm_kind[r]):
            if kind < 0:
                continue
            a = next_index[kind]
            next_index[kind] += 1
            source, destination, _, urgency, due, _, _, _, waits = _fields(
                kind,
                c,
                t,
                fc,
                ft,
                refetch[r],
                hbm_kind[r] == FETCH,
                demand[r],
                quality_bound[r],
                time_to_next_use_s[r],
                nbytes[r, 0],
                nbytes[r, c],
                nbytes[r, t],
                decode_rate[t],
                usable[c],
                usable[t],
                link_gbps[fc, HBM],
                link_latency_s[fc, HBM],
                regenerate_gbps,
                now_s,
                imminent_horizon_s,
                safety_margin_s,
            )
            if kind == EVICT:
                occupancy[hbm_tier[r]] -= nbytes[r, c]
            elif kind == DROP_WARM and not waits:
                tier = host_tier[r] if fc == HOST else cxl_tier[r]
                occupancy[_wrap(tier, n_tiers)] -= nbytes[r, 0]
            if kind >= EVICT or (c != NONE and kind <= TRANSCODE):
                kept[must] = a * n + r
                must += 1
            if kind < EVICT and could_fit[source * 4 + destination]:
                code = source * 4 + destination
                heap_size[code] = _keep_smallest(
                    heap_key,
                    heap_item,
                    heap_start[code],
                    heap_size[code],
                    could_fit[code],
                    _urgency_key(urgency, due, now_s, scratch, bits),
                    a * n + r,
                )
    # Within reach: per link, in (key, index) order, what its budget takes.
    reached = np.empty(heap_start[16], np.int64)
    count = 0
    for code in range(16):
        base = heap_start[code]
        items = heap_item[base : base + heap_size[code]]
        keys = heap_key[base : base + heap_size[code]]
        order = stable_order(items)
        order = order[stable_order(keys[order])]
        busy = busy_fraction[code // 4, code % 4]
        before = 0.0
        for j in order:
            a, r = items[j] // n, items[j] % n
            kind = _kind_of(a, group_start)
            _, _, _, urgency, _, moved_bytes, _, _, _ = _described(
                kind,
                r,
                hbm_encoding,
                target_hbm,
                fallback_level,
                target_fallback,
                refetch,
                hbm_kind,
                demand,
                quality_bound,
                time_to_next_use_s,
                nbytes,
                decode_rate,
                usable,
                link_gbps,
                link_latency_s,
                regenerate_gbps,
                now_s,
                imminent_horizon_s,
                safety_margin_s,
            )
            moved = float(moved_bytes)
            used = busy + before / capacity[code]
            used_after = busy + (before + moved) / capacity[code]
            limit = demotion_busy_fraction if urgency == DEMOTION else 1.0
            if (used < limit and used_after <= limit) or (before == 0 and busy < limit):
                reached[count] = items[j]
                count += 1
            before += moved
    # The actions kept: drops, shrinks and upgrades, and what is within reach; by index.
    reached = sorted_distinct(reached[:count])
    chosen = sorted_distinct(np.concatenate((kept[:must], reached)))
    m = len(chosen)
    block = np.empty(m, np.int64)
    kinds = np.empty(m, np.int8)
    src = np.empty(m, np.int64)
    dst = np.empty(m, np.int64)
    encoding = np.empty(m, np.int64)
    cls = np.empty(m, np.int8)
    deadline = np.empty(m, np.float64)
    size = np.empty(m, np.int64)
    shrink = np.empty(m, np.bool_)
    required_up = np.empty(m, np.bool_)
    held = np.empty(m, np.bool_)
    within_reach = np.zeros(m, np.bool_)
    left_out = on_links.sum()
    j = 0
    for i in range(m):
        a, r = chosen[i] // n, chosen[i] % n
        kind = _kind_of(a, group_start)
        fields = _described(
            kind,
            r,
            hbm_encoding,
            target_hbm,
            fallback_level,
            target_fallback,
            refetch,
            hbm_kind,
            demand,
            quality_bound,
            time_to_next_use_s,
            nbytes,
            decode_rate,
            usable,
            link_gbps,
            link_latency_s,
            regenerate_gbps,
            now_s,
            imminent_horizon_s,
            safety_margin_s,
        )
        block[i], kinds[i] = r, kind
        src[i], dst[i], encoding[i], cls[i], deadline[i], size[i] = fields[:6]
        shrink[i], required_up[i], held[i] = fields[6:]
        while j < len(reached) and reached[j] < chosen[i]:
            j += 1
        within_reach[i] = j < len(reached) and reached[j] == chosen[i]
        left_out -= int(kind < EVICT)
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
        within_reach,
        cancelled,
        occupancy,
        left_out,
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
    link_gbps: np.ndarray,
    busy_fraction: np.ndarray,
    tick_s: float,
    demotion_busy_fraction: float,
    now_s: float,
) -> np.ndarray:
    """Mask of the transfers issued this tick, among the actions on a link (``kind`` below
    ``EVICT``) that ``fits``: per link, in class then deadline order (then index), each gets
    ``gbps * tick_s`` bytes less what transfers in flight already use; a demotion only up to
    ``demotion_busy_fraction``; the first on an idle link always goes."""
    issued = np.zeros(len(src), np.bool_)
    m = 0
    for a in range(len(src)):
        m += int(kind[a] < EVICT and fits[a])
    subset = np.empty(m, np.int64)
    m = 0
    for a in range(len(src)):
        if kind[a] < EVICT and fits[a]:
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
