"""Compiled kernels of the veto (``policy.veto``).

Each greedy choice of the veto walks blocks in a total order and stops where a running sum
passes a limit; the kernels find the stop by weighted selection (``policy._select``) instead of
sorting, with the results of the sorting code they replaced.
"""

from __future__ import annotations

import numpy as np

from policy._select import _jit, boundary, order_keys, split_at
from policy.snapshot import NONE

_ROUNDING = 2.0**-52  # twice the unit roundoff of float64


@_jit
def lease_rule(
    leased: np.ndarray, hbm_encoding: np.ndarray, hbm: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Restore every leased HBM copy the proposal ``hbm`` touched (in place). Returns the rows
    restored and what was proposed for them, and the mask of protected (leased, resident)
    blocks."""
    n = len(hbm)
    protected = np.empty(n, np.bool_)
    count = 0
    for r in range(n):
        protected[r] = leased[r] and hbm_encoding[r] != NONE
        if protected[r] and hbm[r] != hbm_encoding[r]:
            count += 1
    rows = np.empty(count, np.int64)
    proposed = np.empty(count, np.int64)
    k = 0
    for r in range(n):
        if protected[r] and hbm[r] != hbm_encoding[r]:
            rows[k] = r
            proposed[k] = hbm[r]
            hbm[r] = hbm_encoding[r]
            k += 1
    return rows, proposed, protected


@_jit
def disallowed_rows(hbm: np.ndarray, allowed: np.ndarray, protected: np.ndarray) -> np.ndarray:
    """Rows proposed in HBM at an encoding their floor or unknown sensitivity forbids."""
    count = 0
    for r in range(len(hbm)):
        if hbm[r] != NONE and not allowed[r, hbm[r]] and not protected[r]:
            count += 1
    rows = np.empty(count, np.int64)
    k = 0
    for r in range(len(hbm)):
        if hbm[r] != NONE and not allowed[r, hbm[r]] and not protected[r]:
            rows[k] = r
            k += 1
    return rows


@_jit
def quality_costs(
    hbm: np.ndarray, use_probability: np.ndarray, sensitivity: np.ndarray
) -> np.ndarray:
    """Per block: ``p(use) * sensitivity`` at its HBM encoding (0 when not in HBM)."""
    cost = np.zeros(len(hbm))
    for r in range(len(hbm)):
        if hbm[r] != NONE:
            cost[r] = use_probability[r] * sensitivity[r, hbm[r]]
    return cost


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
    n = len(key)
    chosen = np.zeros(n, np.bool_)
    total = 0.0
    for i in range(n):
        if not (np.isfinite(saving[i]) and saving[i] >= 0.0):
            return chosen[:0], False
        total += saving[i]
    if not np.isfinite(target):
        return chosen[:0], False
    margin = (n + 4) * _ROUNDING * total
    if total + margin < target:  # every candidate together does not reach it
        chosen[:] = True
        return chosen, True
    keys = order_keys(key, False)
    subset = np.arange(n)
    # The first candidate at which the running saving reaches the target.
    pivot, before = boundary(keys, keys, False, saving, target, subset)
    if pivot < 0:
        return chosen[:0], False
    if not (before + margin < target and before + saving[pivot] - margin > target):
        return chosen[:0], False
    split_at(keys, keys, False, subset, pivot, chosen)
    chosen[pivot] = True
    return chosen, True


@_jit
def fit_rows(
    rows: np.ndarray,
    fallback: np.ndarray,
    secondary: np.ndarray,
    use_secondary: bool,
    hbm: np.ndarray,
    hbm_tier: np.ndarray,
    nbytes: np.ndarray,
    chosen_density: np.ndarray,
    budget_bytes: np.ndarray,
) -> np.ndarray:
    """The encoding each of ``rows`` ends at when moved to ``fallback`` where its tier has room
    (``NONE``: out of HBM), most valuable first: by ``chosen_density`` descending, then
    ``secondary`` ascending (when used), then position.

    Two greedy rounds per tier: a row fits if its extra bytes and those of every more valuable
    fitting row do; the rows that do not fit leave HBM, and the bytes they free go, in a second
    round, to the rows that did not fit in the first (a late row placed back needs its whole new
    size: its old bytes were counted as freed). Each round keeps a prefix of the order, found by
    selection.
    """
    m = len(rows)
    placed = np.full(m, NONE, np.int64)
    tiers = np.unique(hbm_tier[rows])
    for tier in tiers:
        count = 0
        for k in range(m):
            if hbm_tier[rows[k]] == tier:
                count += 1
        local = np.empty(count, np.int64)
        count = 0
        for k in range(m):
            if hbm_tier[rows[k]] == tier:
                local[count] = k
                count += 1
        used = 0
        for r in range(len(hbm)):
            if hbm_tier[r] == tier and hbm[r] != NONE:
                used += nbytes[r, hbm[r]]
        room = budget_bytes[tier] - float(used)
        density = np.empty(count, np.float64)
        then = np.zeros(count, np.float64)
        grow = np.empty(count, np.int64)
        for j in range(count):
            k = local[j]
            row = rows[k]
            density[j] = chosen_density[row]
            if use_secondary:
                then[j] = secondary[k]
            grow[j] = max(nbytes[row, fallback[k]] - nbytes[row, hbm[row]], 0)
        keys = order_keys(density, True)
        second = order_keys(then, False)
        fits = np.zeros(count, np.bool_)
        pivot, _ = boundary(keys, second, use_secondary, grow, room, np.arange(count))
        split_at(keys, second, use_secondary, np.arange(count), pivot, fits)
        grown = 0
        freed = 0
        rest = 0
        for j in range(count):
            row = rows[local[j]]
            if fits[j]:
                grown += grow[j]
            else:
                freed += nbytes[row, hbm[row]]
                grow[j] = nbytes[row, fallback[local[j]]]  # now: its whole new size
                rest += 1
        spare = room - float(grown) + float(freed)
        later = np.empty(rest, np.int64)
        rest = 0
        for j in range(count):
            if not fits[j]:
                later[rest] = j
                rest += 1
        pivot, _ = boundary(keys, second, use_secondary, grow, spare, later)
        split_at(keys, second, use_secondary, later, pivot, fits)
        for j in range(count):
            if fits[j]:
                placed[local[j]] = fallback[local[j]]
    return placed


@_jit
def hbm_bytes_by_tier(
    hbm: np.ndarray, hbm_tier: np.ndarray, nbytes: np.ndarray, n_tiers: int
) -> np.ndarray:
    """Bytes of the HBM copies (``hbm`` not ``NONE``) per tier."""
    total = np.zeros(n_tiers, np.int64)
    for r in range(len(hbm)):
        if hbm[r] != NONE:
            total[hbm_tier[r]] += nbytes[r, hbm[r]]
    return total
