"""The rules of the schedule phase's candidate actions, one block at a time (compiled).

What a block's HBM copy and fallback copy must do to reach their targets, and each action's
levels, encoding, class, deadline and size: ``policy.schedule``'s rules (see its docstring),
as scalar functions the passes of ``policy._action_kernels`` inline.
"""

from __future__ import annotations

import numpy as np

from policy._link_kernels import (
    DEMAND,
    DEMOTION,
    DROP_WARM,
    EVICT,
    FETCH,
    IMMINENT,
    PREFETCH,
    REGENERATE,
    SPILL,
    TRANSCODE,
    WARM_COPY,
)
from policy._select import _inline
from policy.snapshot import CXL, HBM, HOST, NONE, STORAGE

# What ``_described`` reads of every row, in ``describe``'s order.
RowArrays = tuple[
    np.ndarray,  # hbm_encoding
    np.ndarray,  # target_hbm
    np.ndarray,  # fallback_level
    np.ndarray,  # target_fallback
    np.ndarray,  # refetch
    np.ndarray,  # hbm_kind
    np.ndarray,  # demand
    np.ndarray,  # quality_bound
    np.ndarray,  # time_to_next_use_s
    np.ndarray,  # nbytes
    np.ndarray,  # decode_rate
    np.ndarray,  # usable
    np.ndarray,  # link_gbps
    np.ndarray,  # link_latency_s
    float,  # regenerate_gbps
    float,  # now_s
    float,  # imminent_horizon_s
    float,  # safety_margin_s
]


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
        return fc, dst, 0, _fallback_class(kind), np.inf, full_bytes, False, False, held
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
        move_s = _decoded(target_bytes / (regenerate_gbps * 1e9), full_bytes, decode_rate)
    else:
        src = fc
        move_s = _fetch_s(target_bytes, full_bytes, decode_rate, gbps, latency_s)
    cls = _transfer_class(demand, refetch, c, t_next, imminent_horizon_s)
    deadline = _deadline(now_s, t_next, move_s, safety_margin_s)
    return src, HBM, t, cls, deadline, target_bytes, shrink, required_up, False


@_inline
def _fallback_class(kind: int) -> int:
    """The class of a copy into the warm tier or a spill (their deadline: none, infinite)."""
    return PREFETCH if kind == WARM_COPY else DEMOTION


@_inline
def _decoded(move_s: float, full_bytes: int, decode_rate: float) -> float:
    """``move_s`` and the decoding (``policy.static.Static.decode_s``, row by row)."""
    return move_s + (float(full_bytes) / decode_rate if decode_rate > 0 else 0.0)


@_inline
def _fetch_s(
    target_bytes: int, full_bytes: int, decode_rate: float, gbps: float, latency_s: float
) -> float:
    """How long a fetch takes: latency, transfer and decoding (never less with more bytes or a
    slower decoder: each operation rounds monotonically)."""
    seconds = target_bytes / (gbps * 1e9) if gbps > 0 else np.inf
    return _decoded(latency_s + seconds, full_bytes, decode_rate)


@_inline
def _longest_fetch_s(
    bounds: np.ndarray, decode_rate: np.ndarray, link_gbps: np.ndarray, latency_s: np.ndarray
) -> np.ndarray:
    """Per link code into HBM, a time no fetch on it exceeds (``_fetch_s`` of the most bytes
    moved and decoded, at the slowest decoder that a transfer targets; ``bounds``: see
    ``policy._action_kernels.classify``)."""
    most_moved, most_full, targets = bounds
    slowest_decoder = 0.0
    for e in range(len(decode_rate)):
        rate = decode_rate[e]
        if (targets >> e) & 1 and rate > 0 and (slowest_decoder == 0 or rate < slowest_decoder):
            slowest_decoder = rate
    longest_s = np.zeros(16, np.float64)
    for code in range(HBM, 16, 4):
        level = code // 4
        longest_s[code] = _fetch_s(
            most_moved, most_full, slowest_decoder, link_gbps[level, HBM], latency_s[level, HBM]
        )
    return longest_s


@_inline
def _transfer_class(
    demand: bool, refetch: bool, c: int, t_next: float, imminent_horizon_s: float
) -> int:
    """The class of a fetch or regeneration into HBM of a block whose HBM encoding is ``c``."""
    if demand:
        return DEMAND
    if refetch:
        return DEMOTION
    if c == NONE and t_next < imminent_horizon_s:
        return IMMINENT
    return PREFETCH  # an upgrade of a usable copy is never urgent


@_inline
def _deadline(now_s: float, t_next: float, move_s: float, safety_margin_s: float) -> float:
    """A transfer's deadline: the next use less its move and the margin (a later ``t_next`` or
    a shorter ``move_s`` never gives an earlier one: each operation rounds monotonically)."""
    return now_s + t_next - move_s - safety_margin_s


@_inline
def _described(
    kind: int, r: int, rows: RowArrays
) -> tuple[int, int, int, int, float, int, bool, bool, bool]:
    """``_fields`` of action ``kind`` of row ``r``, read from the arrays (for the few actions
    described after the pass over every block; ``rows``: ``describe``'s bundle of them).

    PERF: inlined, the arrays in one tuple (inlining takes no ``*args``); a compiled call
    passing 14 arrays counted references to each, about 0.3 us a call (1,000 blocks,
    ``describe`` alone on captured inputs, trees alternating: 43, 30 -> 23, 14 us)."""
    (
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
    ) = rows
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
def _kind_of(a: int, group_start: np.ndarray) -> int:
    """The kind of action ``a`` (actions are grouped by kind)."""
    kind = 0
    while a >= group_start[kind + 1]:
        kind += 1
    return kind
