"""Compiled kernels of the schedule phase: the candidate actions.

``classify`` and ``stream`` decide, in two passes over the blocks, the candidate actions of
``policy.schedule`` (see its docstring). Their order is that of the full action table the numpy
code built (fetches, regenerations, transcodes, warm copies, spills, evictions, warm drops; each
group by row), since that order breaks ties later; the table itself is never built
(``policy._action_table.describe`` describes the actions kept).
"""

from __future__ import annotations

import numpy as np

from policy._action_rules import (
    _deadline,
    _fallback_action,
    _fallback_class,
    _fields,
    _hbm_action,
    _link_of,
    _longest_fetch_s,
    _transfer_class,
    _wrap,
)
from policy._link_kernels import (
    DROP_WARM,
    EVICT,
    FETCH,
    KINDS,
    SPILL,
    WARM_COPY,
    _keep_smallest,
    _refused,
    _urgency_key,
)
from policy._select import _jit
from policy.snapshot import CXL, HBM, HOST, NONE, STORAGE

# A block's ``moves`` byte (``classify``): its fallback level (bits 0-1), its target fallback
# level (bits 2-3), and whether it has an HBM copy and a copy in flight. PERF: ``stream`` reads
# it instead of four int64 columns (levels and copies) and the fallback actions. With the demand
# walk's prefetched row (then in ``classify``, now ``policy.demand``), both kernels alone,
# thread CPU time, alternating with b6b43fd, load 4: a million blocks 33.5 -> 31.7 ms (stream
# 12.5 -> 11.0), 16,384 blocks cold 0.85 -> 0.79 ms; ``bench/policy_ab.py`` (load 3.5 to 4.1):
# step ratio 0.980 at 16,384 blocks (schedule phase 0.711 -> 0.636 ms), 0.972 at a million
# (schedule 63.8 -> 57.9 ms). Packing the encodings themselves (no reads of ``hbm_encoding``
# and ``in_flight``) changed nothing.
_RESIDENT = 16
_IN_FLIGHT = 32


@_jit
def classify(
    hbm_encoding: np.ndarray,
    target_hbm: np.ndarray,
    in_flight: np.ndarray,
    fallback_level: np.ndarray,
    target_fallback: np.ndarray,
    nbytes: np.ndarray,
    regenerable: np.ndarray,
    precision: np.ndarray,
    full_precision: np.ndarray,
    hbm_tier: np.ndarray,
    host_tier: np.ndarray,
    cxl_tier: np.ndarray,
    n_tiers: int,
) -> tuple[
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    int,
    int,
    np.ndarray,
    np.ndarray,
]:
    """First pass of the candidate actions: each block's HBM action (-1: none), its ``moves``
    byte (what ``stream`` reads of its levels and copies) and whether its HBM action fetches a
    smaller copy again; the actions of each kind;
    per link, its transfers and the smallest of them; of the transfers into HBM, the most bytes
    moved, the most full bytes and their target encodings (a bit each: ``bounds``); how many
    actions are always kept (drops, shrinks and upgrades of resident copies); how many copies
    in flight are cancelled.

    From the same pass, the targets' placement: per tier, the bytes of the target HBM copies
    and of the target warm (host or CXL) copies. (The encoding a demand promotion would take,
    computed here for every block before, is computed when asked: ``policy.demand``.)

    PERF: one pass for both (the targets and the rows of ``nbytes`` read once; a million
    blocks, thread CPU time, processes alternating, load 3: 11.9 + 13.3 and 10.7 + 12.5 ms
    apart, 18.1 and 18.3 ms together)."""
    n = len(hbm_encoding)
    hbm_bytes = np.zeros(n_tiers, np.int64)
    warm_bytes = np.zeros(n_tiers, np.int64)
    hbm_kind = np.full(n, -1, np.int8)
    moves = np.empty(n, np.uint8)
    refetch = np.zeros(n, np.bool_)
    counts = np.zeros(KINDS, np.int64)
    on_links = np.zeros(16, np.int64)
    smallest = np.full(16, np.iinfo(np.int64).max, np.int64)
    most_moved = most_full = targets = 0  # of the transfers into HBM (targets: a bit each)
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
                moved = nbytes[r, t]
                smallest[code] = min(smallest[code], moved)
                most_moved = max(most_moved, moved)
                most_full = max(most_full, nbytes[r, 0])
                targets |= 1 << t
                must += int(c != NONE)
        kind = _fallback_action(fc, ft)
        if kind >= 0:
            counts[kind] += 1
            if kind == DROP_WARM:
                must += 1
            else:
                code = _link_of(kind, fc, ft)
                on_links[code] += 1
                smallest[code] = min(smallest[code], nbytes[r, 0])
        if f != NONE and f != t:  # noqa: PLR1714 (numba)
            cancels += 1
        # The placement's sums.
        if t != NONE:
            hbm_bytes[hbm_tier[r]] += nbytes[r, t]
        if ft == HOST:
            warm_bytes[host_tier[r]] += nbytes[r, 0]
        elif ft == CXL:
            warm_bytes[cxl_tier[r]] += nbytes[r, 0]
        moves[r] = fc | ft << 2 | _RESIDENT * (c != NONE) | _IN_FLIGHT * (f != NONE)
    return (
        hbm_kind,
        moves,
        refetch,
        counts,
        on_links,
        smallest,
        np.array([most_moved, most_full, targets]),
        must,
        cancels,
        hbm_bytes,
        warm_bytes,
    )


@_jit
def stream(
    hbm_encoding: np.ndarray,
    target_hbm: np.ndarray,
    in_flight: np.ndarray,
    time_to_next_use_s: np.ndarray,
    nbytes: np.ndarray,
    decode_rate: np.ndarray,
    demand: np.ndarray,
    quality_bound: np.ndarray,
    hbm_tier: np.ndarray,
    host_tier: np.ndarray,
    cxl_tier: np.ndarray,
    usable: np.ndarray,
    link_gbps: np.ndarray,
    link_latency_s: np.ndarray,
    regenerate_gbps: float,
    now_s: float,
    imminent_horizon_s: float,
    safety_margin_s: float,
    reach_s: float,
    n_tiers: int,
    hbm_kind: np.ndarray,
    moves: np.ndarray,
    refetch: np.ndarray,
    counts: np.ndarray,
    on_links: np.ndarray,
    smallest: np.ndarray,
    bounds: np.ndarray,
    must: int,
    cancels: int,
) -> tuple[np.ndarray, ...]:
    """Second pass (after ``classify``): the actions always kept, and per link a heap of the
    transfers it could carry within ``reach_s`` (``could_fit`` of them, the most urgent); the
    blocks whose copy in flight is cancelled; each tier's occupancy during the tick after drops
    (ready and in-flight copies). Kept actions are ``index * blocks + row``, indices those of
    the full action table.

    PERF: a fetch offered to a full heap is first keyed by a lower bound of its deadline (that
    of the link's longest fetch, from ``classify``'s ``bounds``), from its row's class and next
    use alone: almost all are refused on it, without their bytes, divisions or exact key.
    Copies into the warm tier and spills have one key per kind (no deadline). Alone on captured
    inputs, alternating with the base, 16,384 blocks: stream 0.27 -> 0.18 ms (classify 0.19 ->
    0.20, the bounds); ``bench/policy_ab.py`` (load 3): step ratio 0.967 at 16,384 blocks
    (schedule phase 1.20 -> 1.01 ms), 0.971 at a million (schedule 62 -> 42 ms)."""
    n = len(hbm_encoding)
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
    longest_s = _longest_fetch_s(bounds, decode_rate, link_gbps, link_latency_s)
    fallback_key = np.empty(2, np.int64)  # of a warm copy, a spill
    for kind in (WARM_COPY, SPILL):
        fallback_key[kind - WARM_COPY] = _urgency_key(
            _fallback_class(kind), np.inf, now_s, scratch, bits
        )
    must = 0
    cancels = 0
    for r in range(n):
        m, hk = moves[r], hbm_kind[r]
        fc, ft = m & 3, m >> 2 & 3
        c = hbm_encoding[r] if m & _RESIDENT else NONE
        if c != NONE:
            occupancy[hbm_tier[r]] += nbytes[r, c]
        if m & _IN_FLIGHT:
            f = in_flight[r]
            if f != target_hbm[r]:
                cancelled[cancels] = r
                cancels += 1
            else:
                occupancy[hbm_tier[r]] += nbytes[r, f]
        if fc == HOST:
            occupancy[_wrap(host_tier[r], n_tiers)] += nbytes[r, 0]
        elif fc == CXL:
            occupancy[_wrap(cxl_tier[r], n_tiers)] += nbytes[r, 0]
        if hk >= 0:
            a = next_index[hk]
            next_index[hk] += 1
            if hk == EVICT:
                occupancy[hbm_tier[r]] -= nbytes[r, c]
                kept[must] = a * n + r
                must += 1
            else:
                if c != NONE:
                    kept[must] = a * n + r
                    must += 1
                code = _link_of(hk, fc, HBM)  # (a target fallback matters to warm copies only)
                if could_fit[code]:
                    base, size = heap_start[code], heap_size[code]
                    refused = False
                    if hk == FETCH and size == could_fit[code]:
                        t_next = time_to_next_use_s[r]
                        cls = _transfer_class(demand[r], refetch[r], c, t_next, imminent_horizon_s)
                        earliest = _deadline(now_s, t_next, longest_s[code], safety_margin_s)
                        refused = not np.isnan(earliest) and _refused(
                            heap_key,
                            heap_item,
                            base,
                            size,
                            could_fit[code],
                            _urgency_key(cls, earliest, now_s, scratch, bits),
                            a * n + r,
                        )
                    if not refused:
                        t = target_hbm[r]
                        _, _, _, urgency, due, _, _, _, _ = _fields(
                            hk,
                            c,
                            t,
                            fc,
                            ft,
                            refetch[r],
                            hk == FETCH,
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
                        heap_size[code] = _keep_smallest(
                            heap_key,
                            heap_item,
                            base,
                            size,
                            could_fit[code],
                            _urgency_key(urgency, due, now_s, scratch, bits),
                            a * n + r,
                        )
        wk = _fallback_action(fc, ft)
        if wk >= 0:
            a = next_index[wk]
            next_index[wk] += 1
            if wk == DROP_WARM:
                if hk != FETCH:  # else it waits for the fetch that reads it
                    tier = host_tier[r] if fc == HOST else cxl_tier[r]
                    occupancy[_wrap(tier, n_tiers)] -= nbytes[r, 0]
                kept[must] = a * n + r
                must += 1
            else:
                code = _link_of(wk, fc, ft)
                if could_fit[code]:
                    heap_size[code] = _keep_smallest(
                        heap_key,
                        heap_item,
                        heap_start[code],
                        heap_size[code],
                        could_fit[code],
                        fallback_key[wk - WARM_COPY],
                        a * n + r,
                    )
    return (
        kept,
        heap_key,
        heap_item,
        heap_start,
        heap_size,
        capacity,
        group_start,
        cancelled,
        occupancy,
    )
