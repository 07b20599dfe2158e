"""Compiled kernels of the quality budget's rounds (rule 3 of ``policy.veto``): which
candidates a round fixes (``choose_fixes``) and the fixes themselves (``fix_round``). The
candidates, and how they are carried from round to round, are in ``policy._veto_candidates``.
"""

from __future__ import annotations

import numpy as np

from policy._select import _jit, order_in_place, order_keys, range_boundary
from policy._veto_candidates import candidate_values
from policy._veto_fit import (
    FIRST,
    fit_tier,
    fits_after,
    group_chosen,
    whole_tier,
)
from policy.snapshot import NONE

_ROUNDING = 2.0**-52  # twice the unit roundoff of float64
_MAX = 0x7FFFFFFFFFFFFFFF


@_jit
def choose_fixes(
    order_key: np.ndarray, saving: np.ndarray, total: float, valid: bool, target: float
) -> tuple[np.ndarray, bool, int]:
    """``budget_choice`` given the candidates' order keys (``order_keys`` of the sort key),
    the sum of their savings in candidate order and whether every saving is finite and >= 0;
    also the least order key of the candidates not chosen (``_MAX`` when none is, or when
    the choice is not certain)."""
    n = len(order_key)
    chosen = np.zeros(n, np.bool_)
    if not valid or not np.isfinite(target):
        return chosen[:0], False, _MAX
    margin = (n + 4) * _ROUNDING * total
    if total + margin < target:  # every candidate together does not reach it
        chosen[:] = True
        return chosen, True, _MAX
    # The first candidate at which the running saving reaches the target. PERF: over the
    # range (range_boundary), marked in one branch-free pass (captured inputs: 16,384 blocks
    # 0.144 -> 0.077 ms; a million blocks' second round, 479,000 candidates, 6.1 -> 2.6 ms
    # with the order keys from the entry's pass).
    pivot, before = range_boundary(order_key, order_key, False, saving, target, 0, n)
    if pivot < 0:
        return chosen[:0], False, _MAX
    if not (before + margin < target and before + saving[pivot] - margin > target):
        return chosen[:0], False, _MAX
    key = order_key[pivot]
    # PERF: the least key left found here (0.007 -> 0.008 ms at 16,384 blocks), not in a pass
    # of ``group_chosen``'s own, where it held the branch-free pass's chain up (that pass
    # 0.019 -> 0.009 ms; a million blocks' second round 0.69 -> 0.23 ms).
    least = _MAX
    for i in range(n):
        taken = (order_key[i] < key) | ((order_key[i] == key) & (i <= pivot))
        chosen[i] = taken
        least = min(least, _MAX if taken else order_key[i])
    return chosen, True, least


@_jit
def budget_choice(key: np.ndarray, saving: np.ndarray, target: float) -> tuple[np.ndarray, bool]:
    """The candidates a quality-budget round fixes: in ``key`` order (ties by position), the
    shortest run whose running saving reaches ``target`` (all when none does), as numpy's
    ``searchsorted(cumsum(saving[order]), target) + 1`` picks them.

    The running sum of the sorting code is sequential, in key order; here it is summed in
    another order. Both are within ``(n + 4) * 2**-52 * total`` of the exact sum (savings are
    >= 0), so the choice is certain unless ``target`` lies that close to a partial sum. Returns
    ``(mask, True)`` when certain, ``(empty, False)`` when the caller must sort.
    """
    total = 0.0
    valid = True
    for i in range(len(saving)):
        valid &= np.isfinite(saving[i]) and saving[i] >= 0.0
        total += saving[i]
    chosen, certain, _ = choose_fixes(order_keys(key, False), saving, total, valid, target)
    return chosen, certain


def sort_keys(order_key: np.ndarray) -> np.ndarray:
    """Float keys that sort as ``order_key`` does (the inverse of ``order_keys`` but for NaN
    payloads and the sign of zero, which no sort tells apart)."""
    bits = np.where(order_key < 0, order_key ^ _MAX, order_key)
    return bits.view(np.float64)


@_jit
def record_buffers(
    records: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], used: int, more: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Record arrays (rows, encodings before and after, costs before) with room for ``more``
    records after the ``used`` first of ``records``: ``records`` itself when they fit, else
    new arrays holding a copy of those, with a quarter more room for later rounds."""
    if used + more <= len(records[0]):
        return records
    size = used + more + (used + more) // 4
    grown = (
        np.empty(size, np.int64), np.empty(size, np.int64), np.empty(size, np.int64),
        np.empty(size, np.float64),
    )  # fmt: skip
    for i in range(used):
        grown[0][i] = records[0][i]
        grown[1][i] = records[1][i]
        grown[2][i] = records[2][i]
        grown[3][i] = records[3][i]
    return grown


@_jit
def fix_round(
    rows: np.ndarray,
    current: np.ndarray,
    fallback: np.ndarray,
    saving: np.ndarray,
    order_key: np.ndarray,
    old_bytes: np.ndarray,
    new_bytes: np.ndarray,
    chosen: np.ndarray,
    least_key: int,
    cost: np.ndarray,
    use_probability: np.ndarray,
    sensitivity: np.ndarray,
    budget_fallback: np.ndarray,
    nbytes: np.ndarray,
    hbm: np.ndarray,
    hbm_tier: np.ndarray,
    chosen_density: np.ndarray,
    budget_bytes: np.ndarray,
    tier_bytes: np.ndarray,
    vetoed_out: np.ndarray,
    quality_bound: np.ndarray,
    held: np.ndarray,
    sticky: float,
    records: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    used: int,
) -> tuple[
    tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    int,
    float,
    tuple[np.ndarray, ...],
    float,
    bool,
    bool,
]:
    """Fix the ``chosen`` candidates of a quality-budget round (``least_key``: the least
    order key of those not chosen, ``_MAX`` when none, as ``choose_fixes`` finds it): each
    moves to its less
    sensitive fallback where its tier has room (``fit_tier``: most valuable first, then most
    saved per byte), else out of HBM; targets, flags, costs and ``tier_bytes`` updated in
    place. The round's records (the rows, ascending, their encodings before, after, and their
    costs before) follow the ``used`` first of ``records`` (``record_buffers``). Returns the
    records and how many are used, the round's next price (the most saving per extra byte
    among the candidates not chosen, minus their sort key; 0 when every candidate is chosen),
    and the next round's candidates with the sum of their savings and whether all are finite
    and >= 0 (``all_candidates`` would find them): a prefix of the candidate arrays given,
    rewritten in place, and True. When some candidates are not chosen, the arrays are returned
    whole, those fixed marked gone or to be made again, for ``compact_candidates`` (the sum and
    the flag are then meaningless), and False.

    PERF: the rounds' records go into one set of arrays (the veto records them as one batch):
    a million blocks' two rounds' records (895,000 and 9,550) were copied into one again by
    ``policy.veto.Rejections.arrays`` (7.2 ms); ``bench/policy_ab.py --sizes 1000000 --steps
    12``, load 3: median step ratio 0.971 (1,000 and 16,384 blocks: 0.983, 1.001)."""
    m = len(rows)
    n_tiers = len(budget_bytes)
    keys = np.empty(m, np.int64)  # of the items grouped by tier (``fit_tier``)
    first = np.zeros((n_tiers, FIRST), np.int64)
    first_count = np.zeros(n_tiers, np.int64)
    least_grow = np.full(n_tiers, _MAX, np.int64)
    total_old = np.zeros(n_tiers, np.int64)
    scratch = np.empty(1)
    bits = scratch.view(np.int64)
    values = order_key.view(np.float64)  # the whole case's order values (keys made after)
    # PERF: every candidate chosen, in one tier (the first round at a million blocks): the
    # candidate arrays are the tier's items as they are, without a grouped copy or a pass to
    # count the tiers (a pass found the tier, or that there are several).
    whole = whole_tier(
        chosen, rows, hbm_tier, chosen_density, order_key, old_bytes, new_bytes, keys,
        first, first_count, least_grow, total_old,
    )  # fmt: skip
    if whole:
        starts = np.zeros(n_tiers + 1, np.int64)
        starts[hbm_tier[rows[0]] + 1 :] = m
        total = m
        local = np.empty(0, np.int64)
        ordinal = local
        second, new_size, old_size = order_key, new_bytes, old_bytes
    else:
        starts, local, ordinal, second, new_size, old_size = group_chosen(
            chosen, rows, hbm_tier, chosen_density, order_key, old_bytes, new_bytes, keys,
            first, first_count, least_grow, total_old,
        )  # fmt: skip
        total = len(local)
    records = record_buffers(records, used, total)
    fixed, before, placed, cost_before = records
    fits = np.zeros(total, np.bool_)
    kept = 0
    next_total = 0.0
    next_valid = True
    for tier in range(n_tiers):
        start, end = starts[tier], starts[tier + 1]
        if start == end:
            continue
        room = budget_bytes[tier] - float(tier_bytes[tier])
        pivot = fit_tier(
            keys, second, True, new_size, old_size, start, end, room,
            first[tier], first_count[tier], least_grow[tier], total_old[tier], fits,
        )  # fmt: skip
        pivot_key, pivot_then = (keys[pivot], second[pivot]) if pivot >= 0 else (0, 0)
        # PERF: the tier's bytes in a register through the loop, stored after (with the
        # sums of ``policy._veto_fit``: captured inputs, 16,384 blocks 0.22 -> 0.20 ms).
        held_bytes = tier_bytes[tier]
        # The records, the targets, and the chosen candidates rewritten as their blocks now
        # are. PERF: when every candidate is chosen (``whole``: items are candidates, in
        # order) they are also moved up in place, written at ``kept`` <= ``j``, never over one
        # still to be read (``second``, ``new_size`` and ``old_size`` are candidate arrays
        # there); otherwise the candidates fixed are marked, gone (row -1) or to be made
        # again (current ``NONE``), for ``compact_candidates`` should another round come (at
        # 16,384 blocks, copying those not chosen cost more than the rest of the round, and
        # one round is the usual case there).
        for j in range(start, end):
            k = j if whole else local[j]
            o = used + (j if whole else ordinal[j])
            r = rows[k]
            fixed[o] = r
            before[o] = current[k]
            cost_before[o] = cost[r]
            held_bytes -= old_size[j]
            if fits_after(fits[j], keys[j], second[j], j, pivot_key, pivot_then, pivot):
                held_bytes += new_size[j]
                encoding = fallback[k]
                quality_bound[r] = True
                cost[r] = use_probability[r] * sensitivity[r, encoding]
            else:
                encoding = NONE
                vetoed_out[r] = True
                cost[r] = 0.0
            placed[o] = encoding
            hbm[r] = encoding
            if not cost[r] > 0:
                if not whole:
                    rows[k] = NONE
                continue
            if not whole:
                # PERF: its values made only if another round comes (at 16,384 blocks one
                # round is the usual case): captured inputs, alternating, the round 0.297 ->
                # 0.263 ms (median ratio 0.89).
                current[k] = NONE
                continue
            # PERF: the block's next candidate, from the table rows just read.
            encoding, better, saved, value, old, new = candidate_values(
                r, cost, hbm, budget_fallback, use_probability, sensitivity, nbytes, held, sticky
            )
            rows[kept] = r
            current[kept] = encoding
            fallback[kept] = better
            saving[kept] = saved
            values[kept] = value + 0.0  # -0.0 + 0.0 is +0.0
            old_bytes[kept] = old
            new_bytes[kept] = new
            next_valid &= np.isfinite(saved) and saved >= 0.0
            next_total += saved
            kept += 1
        tier_bytes[tier] = held_bytes
    if whole:
        # PERF: the order keys in one branch-free pass (``policy._select.order_in_place``), not
        # one at a time through ``key_bits``: a million blocks' captured first round,
        # alternating, 30.6 -> 28.7 ms (median ratio 0.95).
        order_in_place(order_key, kept)
    best_left = 0.0
    if least_key != _MAX:
        bits[0] = least_key ^ _MAX if least_key < 0 else least_key
        if -scratch[0] > best_left:  # noqa: PLR1730 (-0.0 is not above 0.0)
            best_left = -scratch[0]
    size = kept if whole else m
    candidates = (
        rows[:size], current[:size], fallback[:size], saving[:size], order_key[:size],
        old_bytes[:size], new_bytes[:size],
    )  # fmt: skip
    return records, used + total, best_left, candidates, next_total, next_valid, whole
