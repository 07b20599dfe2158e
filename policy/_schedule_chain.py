"""The schedule phase's kernels, called in turn from one compiled function.

``tick`` runs the candidate actions' passes (``classify``, ``stream``, ``describe``: see
``policy._action_kernels``) and then ``finish``: ``admit``, ``link_budgets``, ``resolve``,
``transitions`` and ``transfer_rows`` (``policy._admit_kernels``, ``policy._link_kernels``), as
``policy.schedule.schedule`` called them one by one from Python. The kernels are unchanged; what
they hand each other stays in compiled code.

PERF: each return from a kernel to Python found the interpreter's data evicted by the kernel
before (a pass over 16,384 blocks' columns evicts a 2 MB L2): in the step at 16,384 blocks the
last five calls, on 25 actions, took about 75 us, against 26 us alone and warm
(``bench/policy_kernels.py``). ``python bench/policy_ab.py --base c2a3a64 --sizes 16384
--steps 400``, ``finish`` alone: step ratio 0.977 (schedule phase 0.617 -> 0.585 ms).
"""

from __future__ import annotations

import numpy as np

from policy._action_kernels import classify, stream
from policy._action_table import describe
from policy._admit_kernels import admit, transfer_rows, transitions
from policy._link_kernels import link_budgets, resolve
from policy._select import _jit


@_jit
def finish(
    block: np.ndarray,
    kind: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    encoding: np.ndarray,
    cls: np.ndarray,
    deadline: np.ndarray,
    nbytes: np.ndarray,
    shrink: np.ndarray,
    required_up: np.ndarray,
    held: np.ndarray,
    within_reach: np.ndarray,
    cancelled: np.ndarray,
    occupancy: np.ndarray,
    usable_bytes: np.ndarray,
    hbm_encoding: np.ndarray,
    target_hbm: np.ndarray,
    in_flight: np.ndarray,
    fallback_level: np.ndarray,
    target_fallback: np.ndarray,
    regenerable: np.ndarray,
    demand: np.ndarray,
    vetoed_out: np.ndarray,
    hbm_tier: np.ndarray,
    host_tier: np.ndarray,
    cxl_tier: np.ndarray,
    storage_tier: int,
    block_nbytes: np.ndarray,
    usable: np.ndarray,
    full_precision: np.ndarray,
    codes: np.ndarray,
    link_gbps: np.ndarray,
    busy_fraction: np.ndarray,
    tick_s: float,
    demotion_busy_fraction: float,
    now_s: float,
    max_transitions: int,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], int]:
    """The tick's transitions (``transitions``' columns, the states seen last) and transfers
    (``transfer_rows``' columns), and how many transfers wait for a later tick (of those
    considered). ``occupancy`` is updated in place, as ``admit`` does."""
    fits, spilled = admit(
        block, kind, dst, encoding, cls, deadline, shrink, required_up, held, within_reach,
        occupancy, usable_bytes, hbm_encoding, hbm_tier, host_tier, cxl_tier, block_nbytes,
        max_transitions,
    )  # fmt: skip
    on_links = link_budgets(
        src, dst, cls, deadline, nbytes, kind, fits, link_gbps, busy_fraction, tick_s,
        demotion_busy_fraction, now_s,
    )  # fmt: skip
    issued, kinds, moving, deferred = resolve(kind, on_links, spilled, required_up, held)
    records = transitions(
        block, kinds, issued, spilled, cancelled, hbm_encoding, target_hbm, in_flight,
        fallback_level, target_fallback, regenerable, demand, vetoed_out, block_nbytes, usable,
        full_precision, codes,
    )  # fmt: skip
    transfers = transfer_rows(
        moving, block, src, dst, encoding, nbytes, cls, deadline, hbm_tier, host_tier, cxl_tier,
        storage_tier,
    )  # fmt: skip
    return records, transfers, deferred


@_jit
def tick(
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
    storage_tier: int,
    time_to_next_use_s: np.ndarray,
    decode_rate: np.ndarray,
    demand: np.ndarray,
    quality_bound: np.ndarray,
    vetoed_out: np.ndarray,
    usable: np.ndarray,
    usable_bytes: np.ndarray,
    link_gbps: np.ndarray,
    link_latency_s: np.ndarray,
    busy_fraction: np.ndarray,
    regenerate_gbps: float,
    now_s: float,
    tick_s: float,
    reach_s: float,
    imminent_horizon_s: float,
    safety_margin_s: float,
    demotion_busy_fraction: float,
    max_transitions: int,
    codes: np.ndarray,
    allowed_changes: np.ndarray,
) -> tuple[
    tuple[np.ndarray, ...],
    tuple[np.ndarray, ...],
    int,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    bool,
]:
    """The schedule's tick (``policy.schedule.schedule``): the transitions (``transitions``'
    columns, the states seen last) and transfers (``transfer_rows``' columns), how many
    transfers wait for a later tick, the blocks whose copy in flight is cancelled and those
    copies' encodings, per tier the bytes of the target HBM copies and of the target warm
    copies, and whether a state change seen is not in ``allowed_changes`` (``[S, S, 2]``)."""
    first = classify(
        hbm_encoding, target_hbm, in_flight, fallback_level, target_fallback, nbytes,
        regenerable, precision, full_precision, hbm_tier, host_tier, cxl_tier, n_tiers,
    )  # fmt: skip
    hbm_kind, moves, refetch, counts, on_links, smallest, bounds, must, cancels = first[:9]
    hbm_bytes, warm_bytes = first[9], first[10]
    kept, heap_key, heap_item, heap_start, heap_size, capacity, groups, cancelled, occupancy = (
        stream(
            hbm_encoding, target_hbm, in_flight, time_to_next_use_s, nbytes, decode_rate,
            demand, quality_bound, hbm_tier, host_tier, cxl_tier, usable, link_gbps,
            link_latency_s, regenerate_gbps, now_s, imminent_horizon_s, safety_margin_s, reach_s,
            n_tiers, hbm_kind, moves, refetch, counts, on_links, smallest, bounds, must, cancels,
        )
    )  # fmt: skip
    table = describe(
        hbm_encoding, target_hbm, fallback_level, target_fallback, time_to_next_use_s, nbytes,
        decode_rate, demand, quality_bound, usable, link_gbps, link_latency_s, busy_fraction,
        regenerate_gbps, now_s, imminent_horizon_s, safety_margin_s, demotion_busy_fraction,
        hbm_kind, refetch, on_links, kept, heap_key, heap_item, heap_start, heap_size, capacity,
        groups,
    )  # fmt: skip
    block, kind, src, dst, encoding, cls, deadline, size = table[:8]
    shrink, required_up, held, within_reach, left_out = table[8:]
    records, transfers, deferred = finish(
        block, kind, src, dst, encoding, cls, deadline, size, shrink, required_up, held,
        within_reach, cancelled, occupancy, usable_bytes, hbm_encoding, target_hbm, in_flight,
        fallback_level, target_fallback, regenerable, demand, vetoed_out, hbm_tier, host_tier,
        cxl_tier, storage_tier, nbytes, usable, full_precision, codes, link_gbps, busy_fraction,
        tick_s, demotion_busy_fraction, now_s, max_transitions,
    )  # fmt: skip
    seen = records[-1]
    refused = False
    for i in range(seen.shape[0]):
        for j in range(seen.shape[1]):
            for k in range(seen.shape[2]):
                refused |= seen[i, j, k] and not allowed_changes[i, j, k]
    return (
        records, transfers, deferred + int(left_out), cancelled, in_flight[cancelled], hbm_bytes,
        warm_bytes, refused,
    )  # fmt: skip
