"""Compiled kernels of the score phase (``policy.score``): one pass per block array instead of
a dozen numpy temporaries, and greedy fills by selection (``policy._fill``) instead of sorts.

Each kernel evaluates exactly the expressions of the numpy code it replaced, in the same order
of operations, so results are identical bit for bit (no fused multiply-adds: numba compiles
without fast-math). Byte counts are summed as integers (exact in any order).
"""

from __future__ import annotations

import numpy as np

from policy._fill import take_by_keys
from policy._select import _jit, key_bits, order_in_place
from policy.snapshot import CXL, HOST, NONE, STORAGE


@_jit
def score_rows(
    fallback_level: np.ndarray,
    model: np.ndarray,
    hbm_encoding: np.ndarray,
    leased: np.ndarray,
    placed_at_s: np.ndarray,
    use_probability: np.ndarray,
    time_to_next_use_s: np.ndarray,
    period_s: np.ndarray,
    recovery_by_level: np.ndarray,
    preferred_by_level: np.ndarray,
    unit_density_by_level: np.ndarray,
    inverse_imminence_s: float,
    horizon_s: float,
    now_s: float,
    min_dwell_s: float,
    out_used: np.ndarray,
    out_preferred: np.ndarray,
    out_preferred_density: np.ndarray,
    out_imminence: np.ndarray,
    out_pinned: np.ndarray,
) -> None:
    """Per block: imminence, uses within the horizon, its densest HBM encoding and that
    density (quality weight 0), and whether it is pinned."""
    for r in range(len(fallback_level)):
        level = fallback_level[r]
        p = use_probability[r]
        t_next = time_to_next_use_s[r]
        imminence = 1.0 / (1.0 + t_next * inverse_imminence_s)
        ahead = horizon_s - t_next
        if not ahead >= 0.0 and not np.isnan(ahead):  # np.maximum(ahead, 0.0)
            ahead = 0.0
        used = p * imminence + p * ahead / period_s[model[r]]
        out_used[r] = used
        out_preferred[r] = preferred_by_level[level, r]
        out_preferred_density[r] = used * unit_density_by_level[level, r]
        out_imminence[r] = imminence
        out_pinned[r] = hbm_encoding[r] != NONE and (
            leased[r] or (now_s - placed_at_s[r]) < min_dwell_s
        )


@_jit
def weighted_preference(
    used: np.ndarray,
    fallback_level: np.ndarray,
    recovery_by_level: np.ndarray,
    decode_s: np.ndarray,
    use_probability: np.ndarray,
    sensitivity: np.ndarray,
    nbytes: np.ndarray,
    allowed: np.ndarray,
    quality_weight_s: float,
    out_preferred: np.ndarray,
    out_preferred_density: np.ndarray,
    out_preferred_nbytes: np.ndarray,
) -> None:
    """The densest allowed HBM encoding per block when quality is weighed into the value
    (``np.argmax`` semantics: the first maximum, or the first NaN), and its bytes."""
    for r in range(len(used)):
        base = used[r] * recovery_by_level[fallback_level[r], r]
        weighted_p = quality_weight_s * use_probability[r]
        best = 0
        best_density = 0.0
        for e in range(nbytes.shape[1]):
            value = base - used[r] * decode_s[r, e]
            value -= weighted_p * sensitivity[r, e]
            density = value / nbytes[r, e] if allowed[r, e] else -np.inf
            better = density > best_density or np.isnan(density)
            if e == 0 or (not np.isnan(best_density) and better):
                best = e
                best_density = density
        out_preferred[r] = best
        out_preferred_density[r] = best_density
        out_preferred_nbytes[r] = nbytes[r, best]


@_jit
def choose_hbm(
    hbm_tier: np.ndarray,
    hbm_encoding: np.ndarray,
    fallback_level: np.ndarray,
    placed_at_s: np.ndarray,
    demand: np.ndarray,
    pinned: np.ndarray,
    nbytes: np.ndarray,
    full_nbytes: np.ndarray,
    preferred: np.ndarray,
    preferred_nbytes: np.ndarray,
    by_level: bool,
    preferred_density: np.ndarray,
    penalty_by_level: np.ndarray,
    hbm_tiers: np.ndarray,
    every_block: bool,
    budget_bytes: np.ndarray,
    now_s: float,
    min_dwell_s: float,
    rounds: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Target HBM encoding per block before the veto (``policy.score.choose_targets``): pinned
    blocks keep theirs; each tier's eligible blocks fill what is left of its budget by value
    density (less the hysteresis penalty of a block not resident; a waiting lease first), all
    at full precision when they fit so. Also the bytes of each target HBM copy (where there is
    one; for ``chosen_density``). ``preferred_nbytes``: the bytes of ``preferred``, per fallback
    level (``[4, N]``, the block's level's row) when ``by_level``, else ``[1, N]``.
    ``every_block``: one tier holds every block (its column need not be read).

    PERF: the candidates' bytes from ``preferred_nbytes`` and ``full_nbytes``, not from the
    ``[N, E]`` table of every encoding's (a million blocks: 40 MB read for 16 bytes a block).
    Captured inputs, alternating with the kernel before, caches flushed: 16,384 blocks 0.299 ->
    0.279 ms; a million blocks, median ratio 0.915. ``python bench/policy_ab.py --base
    b6b43fd`` (load 4): a million blocks 0.963 (8 steps), 16,384 blocks 0.993 (200 steps).
    PERF: the targets not set first (the candidate pass sets NONE where it reads a block),
    and 32-bit candidate rows (as in ``choose_fallback``). Captured inputs, cold, alternating,
    16,384 blocks: 0.330 -> 0.316 ms (``choose_fallback`` 0.203 -> 0.201 ms).
    """
    n = len(hbm_tier)
    hbm = np.empty(n, np.int64)
    if len(hbm_tiers) == 0:
        hbm[:] = NONE
    hbm_nbytes = np.empty(n, np.int64)
    pinned_bytes = np.zeros(len(budget_bytes), np.int64)
    one_tier = len(hbm_tiers) == 1
    for tier in hbm_tiers:
        # PERF: one pass builds the candidates (with their order keys) of a lone tier, and
        # (the first tier's) sets the targets NONE that a fill may overwrite.
        first = one_tier or tier == hbm_tiers[0]
        rows = np.empty(n, np.int32)
        keys = np.empty(n, np.int64)
        values = keys.view(np.float64)
        size = np.empty(n, np.int64)
        count = 0
        full_total = 0
        for r in range(n):
            if pinned[r]:
                if first:  # once
                    hbm[r] = hbm_encoding[r]
                    hbm_nbytes[r] = nbytes[r, hbm_encoding[r]]
                    pinned_bytes[hbm_tier[r]] += hbm_nbytes[r]
                continue
            if first:
                hbm[r] = NONE
            if not every_block and hbm_tier[r] != tier:
                continue
            resident = hbm_encoding[r] != NONE
            if not resident and not demand[r] and (now_s - placed_at_s[r]) < min_dwell_s:
                continue  # it left recently: not eligible
            rows[count] = r
            penalty = 0.0 if resident else penalty_by_level[fallback_level[r]]
            density = np.inf if demand[r] else preferred_density[r] - penalty
            values[count] = -density + 0.0
            size[count] = preferred_nbytes[fallback_level[r] if by_level else 0, r]
            full_total += full_nbytes[r]
            count += 1
        order_in_place(keys, count)
        room = budget_bytes[tier] - float(pinned_bytes[tier])
        if full_total <= room:  # all fit at full precision: no trade-off
            for k in range(count):
                hbm[rows[k]] = 0
                hbm_nbytes[rows[k]] = full_nbytes[rows[k]]
            continue
        taken = take_by_keys(keys[:count], size[:count], room, rounds)
        for k in range(count):
            if taken[k]:
                hbm[rows[k]] = preferred[rows[k]]
                hbm_nbytes[rows[k]] = size[k]
    return hbm, hbm_nbytes


@_jit
def chosen_density(
    hbm: np.ndarray,
    hbm_nbytes: np.ndarray,
    full_nbytes: np.ndarray,
    used: np.ndarray,
    fallback_level: np.ndarray,
    recovery_by_level: np.ndarray,
    decode_rate: np.ndarray,
    use_probability: np.ndarray,
    sensitivity: np.ndarray,
    quality_weight_s: float,
) -> np.ndarray:
    """Value per byte of each block's target HBM encoding (0 for blocks not in HBM), of
    ``hbm_nbytes`` bytes (``choose_hbm``'s).

    PERF: the bytes of the target and full copies from two columns, not the [N, E] table of
    every encoding's (a million blocks: 40 MB read for 16 bytes a block). Captured inputs,
    ``choose_hbm`` then ``chosen_density``, alternating: 16,384 blocks 0.294 -> 0.252 ms
    (caches flushed: 0.321 -> 0.309 ms), a million blocks 30.8 -> 26.8 ms.
    """
    out = np.empty(len(hbm))  # PERF: not zeroed first (a pass over every block less)
    for r in range(len(hbm)):
        e = hbm[r]
        if e == NONE:
            out[r] = 0.0
            continue
        rate = decode_rate[e]  # policy.static.Static.decode_s, row by row
        decode_s = float(full_nbytes[r]) / rate if rate > 0 else 0.0
        value = used[r] * (recovery_by_level[fallback_level[r], r] - decode_s)
        if quality_weight_s:
            value -= quality_weight_s * (use_probability[r] * sensitivity[r, e])
        out[r] = value / hbm_nbytes[r]
    return out


@_jit
def choose_fallback(
    fallback_level: np.ndarray,
    leased: np.ndarray,
    regenerable: np.ndarray,
    full_bytes: np.ndarray,
    imminence: np.ndarray,
    host_tier: np.ndarray,
    cxl_tier: np.ndarray,
    host_tiers: np.ndarray,
    cxl_tiers: np.ndarray,
    every_host: bool,
    every_cxl: bool,
    per_byte_s: np.ndarray,
    latency_s: np.ndarray,
    link_gbps: np.ndarray,
    hysteresis_multiple: float,
    usable_bytes: np.ndarray,
    rounds: int,
) -> np.ndarray:
    """Fallback level per block: host, then CXL, by the value of a faster fallback copy
    (``policy.score._choose_fallback``); ``*_tiers`` the tiers of each level that hold blocks.
    A copy into a level costs ``hysteresis_multiple`` times its time per byte from storage
    (``link_gbps``; no link, no copy). ``every_*``: the level's one tier holds every block.

    PERF: no column of the kept copies (each pass tests ``leased`` again), no read of
    ``fallback`` before a fill has set some, nor of a tier column that one tier fills.
    Captured inputs, alternating with the kernel before: 16,384 blocks, median ratios 0.960
    and 0.937 (300 calls each). With ``choose_hbm``'s tier column and ``chosen_density``'s
    unzeroed output, ``python bench/policy_ab.py --base 6b43f80``: the score phase at 16,384
    blocks 0.600 -> 0.578 and 0.593 -> 0.575 ms (step ratios 0.988, 0.992), at a million
    41.9 -> 38.7 ms (step ratio 0.989).
    """
    n = len(fallback_level)
    fallback = np.empty(n, np.int64)  # (not filled first: a pass over every block less)
    if len(host_tiers) == 0:
        for r in range(n):
            kept = leased[r] and fallback_level[r] != STORAGE
            fallback[r] = fallback_level[r] if kept else STORAGE
    filled = False  # a fill before this one took blocks (their ``fallback`` is not STORAGE)
    for level in (HOST, CXL):
        tiers = host_tiers if level == HOST else cxl_tiers
        tier_of = host_tier if level == HOST else cxl_tier
        every = every_host if level == HOST else every_cxl
        saved_rate = per_byte_s[STORAGE] - per_byte_s[level]
        saved_latency = latency_s[STORAGE] - latency_s[level]
        gbps = link_gbps[STORAGE, level]
        copy_cost = hysteresis_multiple / (gbps * 1e9) if gbps > 0 else np.inf
        for tier in tiers:
            # PERF: one pass builds the candidates (with their order keys).
            pinned_bytes = 0
            count = 0
            rows = np.empty(n, np.int32)
            keys = np.empty(n, np.int64)
            values = keys.view(np.float64)
            size = np.empty(n, np.int64)
            # PERF: the first host tier's pass sets every block's kept level or STORAGE
            # (not a pass of its own before). Captured inputs, cold, alternating with the
            # kernel of ed5b2dd (32-bit rows in both figures): 16,384 blocks 0.986 -> 0.963, a
            # million 0.924. ``python bench/policy_ab.py --base 358fa63``: 16,384 blocks 0.988
            # (score 0.618 -> 0.610 ms); a million 0.926 and 0.977 (score 41.7 -> 42.8 and
            # 39.0 -> 37.6 ms): borderline.
            first = level == HOST and tier == host_tiers[0]
            for r in range(n):
                current = fallback_level[r]
                kept = leased[r] and current != STORAGE
                if first:
                    fallback[r] = current if kept else STORAGE
                if not every and tier_of[r] != tier:
                    continue
                if kept:
                    if current == level:
                        pinned_bytes += full_bytes[r]
                    continue
                if regenerable[r] or (filled and fallback[r] != STORAGE):
                    continue
                rows[count] = r
                saved = saved_rate + saved_latency / float(full_bytes[r])
                cost = 0.0 if current == level else copy_cost
                values[count] = -(imminence[r] * saved - cost) + 0.0
                size[count] = full_bytes[r]
                count += 1
            order_in_place(keys, count)
            room = usable_bytes[tier] - float(pinned_bytes)
            taken = take_by_keys(keys[:count], size[:count], room, rounds)
            for k in range(count):
                if taken[k]:
                    fallback[rows[k]] = level
            filled = True
    return fallback


@_jit
def refine_precision(
    hbm: np.ndarray,
    hbm_tier: np.ndarray,
    leased: np.ndarray,
    nbytes: np.ndarray,
    sensitivity: np.ndarray,
    decode_rate: np.ndarray,
    use_probability: np.ndarray,
    imminence: np.ndarray,
    hbm_tiers: np.ndarray,
    every_block: bool,
    least_upgrade_nbytes: np.ndarray,
    budget_bytes: np.ndarray,
    held_bytes: np.ndarray,
    rounds: int,
    hysteresis: bool,
    used: np.ndarray,
    current: np.ndarray,
    pinned: np.ndarray,
    fallback_level: np.ndarray,
    penalty_by_level: np.ndarray,
) -> np.ndarray:
    """Upgrade blocks to full precision with the HBM left after the veto, in place
    (``policy.score.refine``); returns the blocks upgraded. ``held_bytes``: per tier, the
    bytes of the HBM copies ``hbm`` holds. With ``hysteresis``: a ``pinned`` block keeps its
    encoding, decode time saved counts the ``used`` uses within the horizon (not the next
    use's imminence alone), and a block whose ``current`` HBM copy is not at full precision
    pays the move's penalty (``penalty_by_level`` of its fallback level) per byte.
    ``every_block``: one tier holds every block; ``least_upgrade_nbytes``: per encoding, the
    fewest bytes an upgrade from it adds to any block (``max(full - bytes, 0)``)."""
    n = len(hbm)
    scratch = np.empty(1)
    bits = scratch.view(np.int64)
    upgraded = np.empty(n, np.int64)
    n_upgraded = 0
    for tier in hbm_tiers:
        room = budget_bytes[tier] - float(held_bytes[tier])
        if room <= 0:
            continue
        # PERF: with the bytes held known (the veto's tally), only the blocks whose upgrade
        # fits the room at all are candidates (``take_by_keys`` leaves out the others): after
        # the veto the room is a few blocks' worth (a million blocks: 462,000 candidates, each
        # with its gain and order key, for 38 MB of room). Captured inputs, thread CPU time,
        # processes alternating (load 4): a million blocks 17.6, 20.6 -> 8.7, 8.7 ms; 16,384
        # blocks 0.26, 0.24 -> 0.09, 0.06 ms.
        count = 0
        rows = np.empty(n, np.int64)
        keys = np.empty(n, np.int64)
        extra = np.empty(n, np.int64)
        # PERF: a block whose encoding's least upgrade cannot fit is passed over before its
        # tier, lease and sizes are read (the [N, E] table's row: 650 KB at 16,384 blocks).
        # After the veto the room is often below every upgrade (the benchmark's pool at 16,384
        # blocks: 25.4 MB of room, 25.7 MB the least upgrade). Captured inputs, alternating
        # with the kernel before, caches flushed: 16,384 blocks 0.173 -> 0.102 ms; a million
        # blocks (INT8 upgrades fit) median ratio 0.70. ``python bench/policy_ab.py --base
        # ec6ba73``: 16,384 blocks 0.984 (veto phase, refine in it, 0.669 -> 0.627 ms), a
        # million 0.979.
        for r in range(n):
            e = hbm[r]
            if e == NONE or not least_upgrade_nbytes[e] <= room:
                continue
            if e == 0 or (not every_block and hbm_tier[r] != tier):
                continue
            if leased[r] or (hysteresis and pinned[r]):
                continue
            more = nbytes[r, 0] - nbytes[r, e]
            if not max(more, 0) <= room:
                continue  # it can never fit
            p = use_probability[r]
            quality_gain = p * sensitivity[r, e]
            rate = decode_rate[e]  # policy.static.Static.decode_s, row by row
            decode_s = float(nbytes[r, 0]) / rate if rate > 0 else 0.0
            decode_gain = (used[r] if hysteresis else p * imminence[r]) * decode_s
            gain = (quality_gain + decode_gain) / float(max(more, 1))
            if hysteresis and current[r] != 0:
                gain -= penalty_by_level[fallback_level[r]]
            rows[count] = r
            keys[count] = key_bits(-gain, scratch, bits)
            extra[count] = max(more, 0)
            count += 1
        if count == 0:
            continue
        taken = take_by_keys(keys[:count], extra[:count], room, rounds)
        for k in range(count):
            if taken[k]:
                hbm[rows[k]] = 0
                upgraded[n_upgraded] = rows[k]
                n_upgraded += 1
    return upgraded[:n_upgraded].copy()
