"""Compiled ordering and selection: greedy prefixes found without sorting everything.

The control step's greedy choices (fill a tier by value density, fix the most harmful blocks
first) all have one shape: walk the items in a total order, accumulate a weight, stop where it
passes a limit. Only *which* items come before the stop matters, not their order, so a
weighted radix selection finds the stop in a few linear passes where a sort took 40 to 60 ms at a
million items.

Orders are total and deterministic: items compare by an ``int64`` key (``order_keys`` maps floats
to keys that compare as the floats do, with every NaN after every number and ``-0.0 == 0.0``,
as numpy's sorts treat them), then optionally by a second key, then by position. Weights are
``int64`` byte counts, summed exactly; a float weight (a quality saving) is summed in another
order than a sequential cumulative sum, so callers bound the rounding (see ``policy.veto``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeVar, cast

import numba
import numpy as np

_F = TypeVar("_F", bound=Callable[..., object])

_DIGIT_BITS = 11  # 2,048 buckets a level: a 16 KiB histogram, well inside the L1 cache
_SMALL = 24  # subsets this small are finished by insertion sort
_SAMPLE = 64  # keys sampled to place a level's buckets
_MAX = 0x7FFFFFFFFFFFFFFF


# PERF: numpy's error model: a division by zero gives numpy's inf, nan or 0 (as the numpy code
# the kernels replaced did) instead of raising, so no check and raise path follows every
# division: the cached machine code 8.7 -> 6.5 MB, and the step (lockstep with the base tree,
# 1,000 blocks) about 1 % faster, the fewer cache misses on code. Plans identical. Also the
# error model of ``policy._kernels``.
_ERRORS: Final = "numpy"


def _jit(fn: _F) -> _F:
    return cast(_F, numba.njit(cache=True, nogil=True, error_model=_ERRORS)(fn))


def _inline(fn: _F) -> _F:
    """A small helper of the kernels, inlined where it is called.

    PERF: a call to another compiled function that takes arrays counts references to each of
    them (atomic operations): 40 ns a call, more than the helper's own work.
    """
    return cast(_F, numba.njit(cache=True, nogil=True, inline="always", error_model=_ERRORS)(fn))


@_jit
def order_keys(values: np.ndarray, negate: bool) -> np.ndarray:
    """``int64`` keys ordered as ``values`` (or ``-values``): NaN last, ``-0.0`` equal to 0."""
    n = len(values)
    scratch = np.empty(n, np.float64)
    for i in range(n):
        value = -values[i] if negate else values[i]
        scratch[i] = value + 0.0  # -0.0 + 0.0 is +0.0
    keys = scratch.view(np.int64)
    for i in range(n):
        if np.isnan(scratch[i]):
            keys[i] = _MAX
        elif keys[i] < 0:
            keys[i] ^= _MAX  # negative floats: larger magnitude, smaller key
    return keys


@_inline
def key_bits(value: float, scratch: np.ndarray, bits: np.ndarray) -> int:
    """``order_keys`` of one value, through a one-element float array ``scratch`` and its
    ``int64`` view ``bits`` (reused by the caller's loop)."""
    scratch[0] = value + 0.0
    if np.isnan(value):
        return _MAX
    key = int(bits[0])
    return key ^ _MAX if key < 0 else key


@_inline
def _less(key_i: int, then_i: int, i: int, key_j: int, then_j: int, j: int) -> bool:
    """(key, then, position) order. Scalars only: see ``_inline``."""
    if key_i != key_j:
        return key_i < key_j
    if then_i != then_j:
        return then_i < then_j
    return i < j


@_inline
def _bucket(key: int, lo: int, hi: int, shift: np.uint64, top: int) -> int:
    """0 below ``lo``, ``top`` above ``hi``, else 1 + the key's offset from ``lo`` shifted."""
    if key < lo:
        return 0
    if key > hi:
        return top
    return 1 + int((np.uint64(key) - np.uint64(lo)) >> shift)


@_jit
def stable_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for integer keys: a bottom-up merge sort.

    PERF: numba's own stable argsort compiles to a large function that every kernel using it
    links and optimizes again; this one is small (the kernels' first compilation took 40 s).
    """
    n = len(keys)
    order = np.arange(n)
    if n < 2:
        return order
    spare = np.empty(n, np.int64)
    width = 1
    while width < n:
        for low in range(0, n, 2 * width):
            middle = min(low + width, n)
            high = min(low + 2 * width, n)
            i, j, k = low, middle, low
            while i < middle and j < high:
                if keys[order[j]] < keys[order[i]]:
                    spare[k] = order[j]
                    j += 1
                else:
                    spare[k] = order[i]
                    i += 1
                k += 1
            while i < middle:
                spare[k] = order[i]
                i += 1
                k += 1
            while j < high:
                spare[k] = order[j]
                j += 1
                k += 1
        order, spare = spare, order
        width *= 2
    return order


@_jit
def sorted_distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array."""
    ordered = values[stable_order(values)]
    count = 0
    for i in range(len(ordered)):
        if i == 0 or ordered[i] != ordered[i - 1]:
            ordered[count] = ordered[i]
            count += 1
    distinct: np.ndarray = ordered[:count].copy()
    return distinct


@_jit
def _sorted_subset(
    primary: np.ndarray, secondary: np.ndarray, use_secondary: bool, subset: np.ndarray
) -> np.ndarray:
    """``subset`` (ascending positions) in the total order."""
    m = len(subset)
    out = subset.copy()
    if m <= _SMALL:
        for a in range(1, m):
            item = out[a]
            key = primary[item]
            then = secondary[item] if use_secondary else 0
            b = a - 1
            while b >= 0:
                other = out[b]
                other_then = secondary[other] if use_secondary else 0
                if not _less(key, then, item, primary[other], other_then, other):
                    break
                out[b + 1] = other
                b -= 1
            out[b + 1] = item
        return out
    # Stable sorts, least significant key first (positions are already ascending).
    if use_secondary:
        out = out[stable_order(secondary[out])]
    ordered: np.ndarray = out[stable_order(primary[out])]
    return ordered


@_jit
def _buckets_of(sample: np.ndarray) -> tuple[int, int, np.uint64, int]:
    """A level's buckets from a sorted sample of its keys, less the sample's outer sixteenths
    (outliers do not crowd the rest into one bucket): ``(lo, hi, shift, top)`` for
    :func:`_bucket`, at most ``2 ** _DIGIT_BITS`` buckets between ``lo`` and ``hi``."""
    trim = len(sample) // 16
    lo, hi = sample[trim], sample[len(sample) - 1 - trim]
    span = np.uint64(hi) - np.uint64(lo)
    bits = 0
    while span != 0:
        span >>= np.uint64(1)
        bits += 1
    shift = np.uint64(max(bits - _DIGIT_BITS, 0))
    return lo, hi, shift, int((np.uint64(hi) - np.uint64(lo)) >> shift) + 2


@_jit
def _span(keys: np.ndarray, items: np.ndarray) -> tuple[int, int]:
    low = keys[items[0]]
    high = low
    for i in items:
        low = min(low, keys[i])
        high = max(high, keys[i])
    return low, high


@_jit
def boundary(
    primary: np.ndarray,
    secondary: np.ndarray,
    use_secondary: bool,
    weight: np.ndarray,
    limit: float,
    subset: np.ndarray,
) -> tuple[int, float]:
    """The first item of ``subset`` (ascending positions), in the total order, at which the
    running weight passes ``limit`` (is no longer ``<= limit``): its position and the weight of
    the items before it; or ``-1`` and the whole subset's weight when everything fits.

    Weights (``>= 0``) are summed per histogram bucket, not in order: exact for integer weights
    (below 2**53), within rounding for float ones. Each level buckets the keys by their leading
    differing bits and keeps the bucket where the running weight passes the limit; among equal
    keys, the second key (when used) is selected on the same way, then positions are in order.
    """
    before = 0.0
    m = len(subset)
    if m == 0:
        return -1, before
    if not limit >= 0.0:  # the first item already passes
        return _sorted_subset(primary, secondary, use_secondary, subset)[0], before
    current = subset
    owned = False  # ``current`` is the caller's until narrowed once
    keys = primary
    on_secondary = False
    low, high = _span(keys, current)
    # PERF: two tables (even and odd items) in the weights' own type: skewed keys hit one
    # bucket again and again, and each add then waits for the last (a float add twice as long).
    totals = np.empty((2, (1 << _DIGIT_BITS) + 2), weight.dtype)
    while True:
        if low == high and use_secondary and not on_secondary:
            keys = secondary  # every primary key ties: the second key decides
            on_secondary = True
            low, high = _span(keys, current[:m])
            continue
        if m <= _SMALL or low == high:
            ordered = current[:m]  # ascending positions: in order if every key ties
            if low != high:
                ordered = _sorted_subset(primary, secondary, use_secondary, ordered)
            for i in ordered:
                if not before + weight[i] <= limit:
                    return i, before
                before += weight[i]
            return -1, before
        # Buckets over the keys of a strided sample less its outer sixteenths (so that a few
        # outliers do not crowd everything else into one bucket), plus one below and one above.
        # Before each level the running weight is <= limit, so the bucket where it passes the
        # limit has a positive weight: it is not empty.
        step = max(m // _SAMPLE, 1)
        sample = keys[current[:m:step]]
        sample = sample[stable_order(sample)]
        lo, hi, shift, top = _buckets_of(sample)
        totals[:] = 0
        for k in range(m):
            i = current[k]
            totals[k & 1, _bucket(keys[i], lo, hi, shift, top)] += weight[i]
        chosen = -1
        for bucket in range(top + 1):
            bucket_total = float(totals[0, bucket] + totals[1, bucket])
            if not before + bucket_total <= limit:
                chosen = bucket
                break
            before += bucket_total
        if chosen < 0:
            return -1, before
        # Narrow to the chosen bucket (into a fresh array once, then in place), tracking its
        # smallest and largest keys for the next level.
        narrowed = current if owned else np.empty(m, np.int64)
        count = 0
        low, high = high, low
        for k in range(m):
            i = current[k]
            if _bucket(keys[i], lo, hi, shift, top) == chosen:
                narrowed[count] = i
                count += 1
                low = min(low, keys[i])
                high = max(high, keys[i])
        current = narrowed
        owned = True
        m = count


@_jit
def range_boundary(
    keys: np.ndarray,
    second: np.ndarray,
    use_secondary: bool,
    weight: np.ndarray,
    limit: float,
    start: int,
    end: int,
) -> tuple[int, float]:
    """``boundary(keys, second, use_secondary, weight, limit, np.arange(start, end))``: its
    first level runs over the range itself, and ``boundary`` goes on in the bucket where the
    running weight passes ``limit``, with the limit less the weight of the buckets before it.
    Exact for ``int64`` weights summing below 2**53 (else, or when the keys barely spread,
    ``boundary`` does it all); for float weights, the weight before the item is within the
    rounding of a sum in another order, as ``boundary``'s is.

    PERF: a million items: no index array to write, and one pass less over the keys
    (``boundary`` first spans them).
    """
    m = end - start
    if m <= _SAMPLE or not limit >= 0.0:
        return boundary(keys, second, use_secondary, weight, limit, np.arange(start, end))
    # Buckets over a strided sample less its outer sixteenths, as ``boundary``'s levels.
    sample = np.sort(keys[start : end : m // _SAMPLE])
    lo, hi, shift, top = _buckets_of(sample)
    totals = np.zeros(top + 1, weight.dtype)
    counts = np.zeros(top + 1, np.int64)
    for j in range(start, end):
        bucket = _bucket(keys[j], lo, hi, shift, top)
        totals[bucket] += weight[j]
        counts[bucket] += 1
    if totals.sum() >= 2**53 or counts.max() == m:
        return boundary(keys, second, use_secondary, weight, limit, np.arange(start, end))
    before = totals[0] - totals[0]  # in the weights' type: integers are summed exactly
    chosen = -1
    for bucket in range(top + 1):
        if not float(before + totals[bucket]) <= limit:
            chosen = bucket
            break
        before += totals[bucket]
    if chosen < 0:
        return -1, float(before)
    narrowed = np.empty(counts[chosen], np.int64)
    count = 0
    for j in range(start, end):
        if _bucket(keys[j], lo, hi, shift, top) == chosen:
            narrowed[count] = j
            count += 1
    pivot, rest = boundary(keys, second, use_secondary, weight, limit - float(before), narrowed)
    return pivot, float(before) + rest


@_jit
def mark_before(
    primary: np.ndarray,
    secondary: np.ndarray,
    use_secondary: bool,
    subset: np.ndarray,
    pivot: int,
    mark: np.ndarray,
) -> None:
    """Set ``mark`` for the items of ``subset`` before ``pivot`` in the total order (all of
    them when ``pivot`` is -1)."""
    if pivot < 0:
        for i in subset:
            mark[i] = True
        return
    key = primary[pivot]
    then = secondary[pivot] if use_secondary else 0
    for i in subset:
        # PERF: branch-free (random keys mispredict).
        if use_secondary:
            then_less = secondary[i] < then
            then_equal = secondary[i] == then
        else:
            then_less = False
            then_equal = True
        mark[i] |= (primary[i] < key) | (
            (primary[i] == key) & (then_less | (then_equal & (i < pivot)))
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
