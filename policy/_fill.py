"""Compiled greedy fills: the densest items whose bytes fit a budget, round by round.

``take_by_keys`` is the greedy of every fill by value density (HBM, the warm tiers, precision
upgrades): walk the items in key order, take each that still fits, and after ``rounds`` misses
stop. It finds each round's cut by the selection of ``policy._select`` (weighted buckets, no
sort of everything); its first round, over every item, has a pass of its own
(``_first_round``).
"""

from __future__ import annotations

import numpy as np

from policy._select import (
    _MAX,
    _SAMPLE,
    _SMALL,
    _buckets_of,
    _inline,
    _jit,
    _sorted_subset,
    boundary,
    order_keys,
    stable_order,
)


@_jit
def take_by_density(
    density: np.ndarray, nbytes: np.ndarray, budget: float, rounds: int
) -> np.ndarray:
    """Mask of the densest items whose bytes fit ``budget`` together (see
    ``policy.score.take_by_density``, whose rounds this reproduces exactly)."""
    return take_by_keys(order_keys(density, True), nbytes, budget, rounds)


@_jit
def take_by_keys(keys: np.ndarray, nbytes: np.ndarray, budget: float, rounds: int) -> np.ndarray:
    """``take_by_density`` with the order given as keys (``order_keys`` of minus the
    densities): the lowest key first, ties by position."""
    n = len(keys)
    taken = np.zeros(n, np.bool_)
    total = 0
    count = 0  # the items that can fit at all (what cannot is never taken)
    smallest = _MAX
    for i in range(n):
        total += nbytes[i]
        count += int(nbytes[i] <= budget)
        smallest = min(smallest, nbytes[i])
    if total <= budget:
        taken[:] = True
        return taken
    if budget <= 0 or count == 0 or rounds <= 0:
        return taken
    left = float(budget)
    subset = np.empty(count, np.int64)
    if count == n and n > _SAMPLE and total < 2**53 and smallest >= 0:
        # PERF: every item can fit (the usual case): the first round selects over the items
        # themselves (``_first_round``), with no index array of every item to write and read
        # back (a million blocks' candidates of ``choose_hbm``, one process each, load 5:
        # 11.7 -> 7.6 ms; the kernel 27.1 -> 21.4 ms, ``choose_fallback`` 18.6 -> 15.3 ms).
        left, count = _first_round(keys, nbytes, left, smallest, subset, taken)
        if count > 0:
            _rounds(keys, nbytes, left, subset[:count], rounds - 1, taken)
        return taken
    count = 0
    for i in range(n):
        if nbytes[i] <= budget:
            subset[count] = i
            count += 1
    _rounds(keys, nbytes, left, subset, rounds, taken)
    return taken


_EMPTY = -0x8000000000000000  # no ``order_keys`` key (it would be a NaN's)


@_jit
def _key_totals(keys: np.ndarray, nbytes: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys (in no order) and the bytes of each, by a hash table; two empty
    arrays when there are more than ``most`` (or more than 64 and a quarter of the items
    looked at, so that keys mostly distinct are given up early), or the key ``_EMPTY``.
    Runs of equal keys are summed before they are looked up."""
    bits = 1
    while (1 << bits) < 2 * most:
        bits += 1
    mask = np.uint64((1 << bits) - 1)
    slot_key = np.full(1 << bits, _EMPTY, np.int64)
    slot_total = np.zeros(1 << bits, np.int64)
    distinct = 0
    run_key = keys[0]
    run_total = 0
    n = len(keys)
    for i in range(n + 1):
        if i < n and keys[i] == run_key:
            run_total += nbytes[i]
            continue
        if run_key == _EMPTY:
            return slot_key[:0], slot_total[:0]
        slot = (np.uint64(run_key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits)
        while slot_key[slot] != run_key:
            if slot_key[slot] == _EMPTY:
                if distinct == most or distinct > 64 + i // 4:
                    return slot_key[:0], slot_total[:0]
                slot_key[slot] = run_key
                distinct += 1
                break
            slot = (slot + np.uint64(1)) & mask
        slot_total[slot] += run_total
        if i < n:
            run_key = keys[i]
            run_total = nbytes[i]
    distinct = 0
    for k in range(1 << bits):
        if slot_key[k] != _EMPTY:
            slot_key[distinct] = slot_key[k]
            slot_total[distinct] = slot_total[k]
            distinct += 1
    return slot_key[:distinct], slot_total[:distinct]


@_jit
def _first_round(
    keys: np.ndarray,
    nbytes: np.ndarray,
    limit: float,
    smallest: int,
    subset: np.ndarray,
    taken: np.ndarray,
) -> tuple[float, int]:
    """The greedy's first round over every item (each can fit, none weighs less than 0, all
    together more than ``limit`` and less than 2**53 bytes): marks the run in ``taken``,
    puts what follows the pivot and can still fit in ``subset`` (``n`` long); returns the
    bytes left and how many follow.

    The sums are exact integers below 2**53 compared with ``limit`` (below them too), so any
    grouping of the items finds the pivot and the bytes before it that ``range_boundary``
    finds. PERF: few distinct keys (a warm tier's fill: 142 among 16,384 candidates, in runs
    of a hundred) are totalled exactly, and one more pass marks the keys below the pivot's;
    else one bucket pass (``range_boundary``'s buckets, no counts, no branches) and one pass
    that marks the lower buckets and gathers the chosen one. The passes before: the sum,
    ``range_boundary``'s two, ``boundary``'s on a bucket of 9,374 items (keys of both signs
    spread over 4 of 2,048 buckets) and the marking. ``take_by_keys`` on captured inputs,
    alternating with the passes before: 16,384 blocks ``choose_fallback`` 0.120 -> 0.040 ms,
    ``choose_hbm`` 0.068 -> 0.065 ms; a million blocks ``choose_hbm`` 10.8 -> 7.2 ms,
    ``choose_fallback`` 5.9 -> 5.4 ms, ``refine_precision`` 3.5 -> 2.2 ms.
    """
    n = len(keys)
    distinct, key_totals = _key_totals(keys, nbytes, 512 if n < 65536 else 8192)
    before = 0
    if len(distinct):
        order = stable_order(distinct)
        first = distinct[order[-1]]
        for k in order:
            if not float(before + key_totals[k]) <= limit:
                first = distinct[k]
                break
            before += key_totals[k]
        last = first
    else:
        sample = np.sort(keys[0 : n : n // _SAMPLE])
        lo, hi, shift, top = _buckets_of(sample)
        totals = np.zeros((2, top + 1), np.int64)
        for i in range(n):
            totals[i & 1, _bucket_of(keys[i], lo, hi, shift, top)] += nbytes[i]
        chosen = top
        for bucket in range(top + 1):
            bucket_total = totals[0, bucket] + totals[1, bucket]
            if not float(before + bucket_total) <= limit:
                chosen = bucket
                break
            before += bucket_total
        first, last = _bucket_keys(chosen, lo, hi, shift, top)
    # The keys below ``first`` are taken, those in [first, last] narrowed to (ascending).
    m = 0
    for j in range(n):
        taken[j] = keys[j] < first
        subset[m] = j
        m += int((keys[j] >= first) & (keys[j] <= last))
    if first == last:
        pivot = -1
        for k in range(m):
            j = subset[k]
            if not float(before + nbytes[j]) <= limit:
                pivot = j
                break
            before += nbytes[j]
        rest = 0.0
    else:
        pivot, rest = boundary(keys, keys, False, nbytes, limit - float(before), subset[:m])
    if pivot < 0:
        taken[:] = True
        return limit, 0
    left = limit - (float(before) + rest)
    key = keys[pivot]
    for k in range(m):
        j = subset[k]
        taken[j] = (keys[j] < key) | ((keys[j] == key) & (j < pivot))
    if not left >= smallest:
        return left, 0
    count = 0
    for row in range(n):
        if not taken[row] and row != pivot and nbytes[row] <= left:
            subset[count] = row
            count += 1
    return left, count


@_inline
def _bucket_of(key: int, lo: int, hi: int, shift: np.uint64, top: int) -> int:
    """``_bucket`` without branches (keys outside [lo, hi] mispredict)."""
    bucket = 1 + int((np.uint64(key) - np.uint64(lo)) >> shift)
    bucket = top if key > hi else bucket
    return 0 if key < lo else bucket


@_inline
def _bucket_keys(chosen: int, lo: int, hi: int, shift: np.uint64, top: int) -> tuple[int, int]:
    """The smallest and largest key of bucket ``chosen`` (which is not empty)."""
    if chosen == 0:
        return -_MAX - 1, lo - 1
    if chosen == top:
        return hi + 1, _MAX
    first = lo + int(np.uint64(chosen - 1) << shift)  # (wraps back into [lo, hi])
    last = hi if chosen == top - 1 else lo + int(np.uint64(chosen) << shift) - 1
    return first, last


@_jit
def _rounds(
    keys: np.ndarray,
    nbytes: np.ndarray,
    left: float,
    subset: np.ndarray,
    rounds: int,
    taken: np.ndarray,
) -> None:
    """The greedy's ``rounds`` rounds over ``subset`` (ascending positions, the items that can
    fit in ``left``), marking ``taken``."""
    for done in range(rounds):
        if len(subset) <= _SMALL:
            # The few left: in order, round by round (each drops what cannot fit any more,
            # takes the longest run that fits, and skips the item that did not).
            ordered = _sorted_subset(keys, keys, False, subset)
            rounds_left = rounds - done
            start = left
            run = 0
            for item in ordered:
                if nbytes[item] > start:
                    continue
                if run + nbytes[item] <= start:
                    taken[item] = True
                    run += nbytes[item]
                    continue
                left = start - float(run) if run else start
                rounds_left -= 1
                if rounds_left == 0:
                    break
                start = left
                run = 0
            break
        pivot, before = boundary(keys, keys, False, nbytes, left, subset)
        if pivot < 0:
            for item in subset:
                taken[item] = True
            break
        left -= before
        # Mark the run, and keep what follows the skipped pivot and can still fit.
        key = keys[pivot]
        count = 0
        for item in subset:
            if (keys[item] < key) | ((keys[item] == key) & (item < pivot)):
                taken[item] = True
            elif item != pivot and nbytes[item] <= left:
                subset[count] = item
                count += 1
        subset = subset[:count]
        if count == 0:
            break
