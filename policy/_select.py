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
    order_in_place(keys, n)
    return keys


@_inline
def order_in_place(keys: np.ndarray, count: int) -> None:
    """The first ``count`` of ``keys``, which hold floats (``value + 0.0``), made their
    ``order_keys`` in place (``order_keys`` itself, and the fills' candidate passes).

    PERF: the candidate passes of ``choose_hbm`` and ``choose_fallback`` store each value and
    turn them into keys in one pass after (branch-free, it vectorizes), instead of ``key_bits``
    through a one-element array each. Captured inputs, 16,384 blocks, alternating:
    ``choose_hbm`` 0.349 -> 0.330 ms, ``choose_fallback`` 0.192 -> 0.175 ms. ``python
    bench/policy_ab.py --base 306e4bf``: 16,384 blocks ratios 0.985 (200 steps), 0.967 (300);
    a million 1.010 (8 steps), 0.983 (10). Keys made a chunk of 1,024 at a time (to stay in
    L1 at a million) were slower at 16,384 blocks (1.10, 1.18 the kernels); ``refine_precision``
    gained nothing (its candidates are few). Branch-free candidate passes (every block written,
    counted when eligible: all but 76 of 16,384 are) were slower (1.03, 1.13).
    """
    values = keys.view(np.float64)
    for k in range(count):
        key = keys[k]
        key ^= (key >> 63) & _MAX
        keys[k] = _MAX if np.isnan(values[k]) else key


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
