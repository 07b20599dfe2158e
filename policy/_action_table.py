"""Compiled kernel of the schedule phase: the candidate actions kept, described.

``describe`` runs after ``policy._action_kernels``' two passes (``classify``, ``stream``): it
takes from each link's heap what the link's budget carries within reach, adds the actions
always kept, and describes those alone (block, kind, levels, encoding, class, deadline, bytes),
by action index, so the table of every candidate is never built.
"""

from __future__ import annotations

import numpy as np

from policy._action_rules import _described, _kind_of
from policy._link_kernels import DEMOTION, EVICT
from policy._select import _jit, sorted_distinct, stable_order


@_jit
def describe(
    hbm_encoding: np.ndarray,
    target_hbm: np.ndarray,
    fallback_level: np.ndarray,
    target_fallback: np.ndarray,
    time_to_next_use_s: np.ndarray,
    nbytes: np.ndarray,
    decode_rate: np.ndarray,
    demand: np.ndarray,
    quality_bound: np.ndarray,
    usable: np.ndarray,
    link_gbps: np.ndarray,
    link_latency_s: np.ndarray,
    busy_fraction: np.ndarray,
    regenerate_gbps: float,
    now_s: float,
    imminent_horizon_s: float,
    safety_margin_s: float,
    demotion_busy_fraction: float,
    hbm_kind: np.ndarray,
    refetch: np.ndarray,
    on_links: np.ndarray,
    kept: np.ndarray,
    heap_key: np.ndarray,
    heap_item: np.ndarray,
    heap_start: np.ndarray,
    heap_size: np.ndarray,
    capacity: np.ndarray,
    group_start: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Last step (after ``stream``): which heap transfers each link's budget within reach takes
    (in (key, index) order), and the table of the actions kept and those, by index. Per action:
    its block, kind, source and destination levels, encoding, class, deadline, bytes on its
    link (0 for a drop), whether it shrinks a resident copy, is an upgrade the veto requires, is
    held, and is within reach; then how many transfers were left out (they wait)."""
    n = len(hbm_encoding)
    # What _described reads of every row, bundled once for its two calls below.
    rows = (
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
    # Within reach: per link, in (key, index) order, what its budget takes.
    reached = np.empty(heap_start[16], np.int64)
    count = 0
    for code in range(16):
        if heap_size[code] == 0:  # PERF: no sorts of nothing (16 links, most idle)
            continue
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
            _, _, _, urgency, _, moved_bytes, _, _, _ = _described(kind, r, rows)
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
    chosen = sorted_distinct(np.concatenate((kept, reached)))
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
        fields = _described(kind, r, rows)
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
        left_out,
    )
