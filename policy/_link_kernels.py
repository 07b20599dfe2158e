"""Compiled kernels of the schedule phase: per-link byte budgets and what a tick does.

``link_budgets`` issues the most urgent transfers of each link within its byte budget (the
kept candidates ordered in a small heap, never a sort of all of them); ``resolve`` turns the
admitted and issued actions into what the tick does. The heap helpers are shared with
``policy._action_kernels.actions``, which keeps the transfers within reach of each link as the
blocks stream past.
"""

from __future__ import annotations

import numpy as np

from policy._select import _MAX as _MAX_KEY
from policy._select import _inline, _jit, key_bits

# Action kinds (see policy._action_kernels), and priority classes (policy.plan.Priority).
FETCH, REGENERATE, TRANSCODE, WARM_COPY, SPILL, EVICT, DROP_WARM = range(7)
KINDS = 7
DEMAND, IMMINENT, PREFETCH, DEMOTION = range(4)


@_inline
def _urgency_key(
    cls: int, deadline: float, now_s: float, scratch: np.ndarray, bits: np.ndarray
) -> int:
    """Order key of a transfer on its link: class first, then deadline (seconds from now,
    clipped), as ``order_keys`` maps ``cls * 1e12 + clip(deadline - now)``."""
    ahead = deadline - now_s  # np.clip(ahead, -1e11, 1e11), NaN kept
    if ahead < -1e11:
        ahead = -1e11
    elif ahead > 1e11:
        ahead = 1e11
    return key_bits(cls * 1e12 + ahead, scratch, bits)


@_inline
def _heap_greater(key: int, a: int, other_key: int, other_a: int) -> bool:
    return key > other_key or (key == other_key and a > other_a)


@_inline
def _refused(
    heap_key: np.ndarray,
    heap_item: np.ndarray,
    base: int,
    size: int,
    capacity: int,
    key: int,
    item: int,
) -> bool:
    """Whether ``_keep_smallest`` refuses ``(key, item)``: the heap is full and ``(key, item)``
    is not smaller than the largest kept (so it refuses any larger key of ``item`` too)."""
    return size == capacity and not _heap_greater(heap_key[base], heap_item[base], key, item)


@_inline
def _keep_smallest(
    heap_key: np.ndarray,
    heap_item: np.ndarray,
    base: int,
    size: int,
    capacity: int,
    key: int,
    item: int,
) -> int:
    """Offer ``(key, item)`` to the max-heap ``[base, base + size)`` that keeps the
    ``capacity`` smallest; returns its new size."""
    if size == capacity:
        if _refused(heap_key, heap_item, base, size, capacity, key, item):
            return size
        i = 0  # replace the root, sift down
        while True:
            child = 2 * i + 1
            if child >= size:
                break
            if child + 1 < size and _heap_greater(
                heap_key[base + child + 1],
                heap_item[base + child + 1],
                heap_key[base + child],
                heap_item[base + child],
            ):
                child += 1
            if not _heap_greater(heap_key[base + child], heap_item[base + child], key, item):
                break
            heap_key[base + i] = heap_key[base + child]
            heap_item[base + i] = heap_item[base + child]
            i = child
        heap_key[base + i] = key
        heap_item[base + i] = item
        return size
    i = size  # append, sift up
    while i > 0:
        parent = (i - 1) // 2
        if not _heap_greater(key, item, heap_key[base + parent], heap_item[base + parent]):
            break
        heap_key[base + i] = heap_key[base + parent]
        heap_item[base + i] = heap_item[base + parent]
        i = parent
    heap_key[base + i] = key
    heap_item[base + i] = item
    return size + 1


@_jit
def link_budgets(
    src: np.ndarray,
    dst: np.ndarray,
    cls: np.ndarray,
    deadline: np.ndarray,
    size: np.ndarray,
    kind: np.ndarray,
    fits: np.ndarray,
    link_gbps: np.ndarray,
    busy_fraction: np.ndarray,
    tick_s: float,
    demotion_busy_fraction: float,
    now_s: float,
) -> np.ndarray:
    """Mask of the transfers issued this tick, among the actions on a link (``kind`` below
    ``EVICT``) that ``fits``: per link, in class then deadline order (then index), each gets
    ``gbps * tick_s`` bytes less what transfers in flight already use; a demotion only up to
    ``demotion_busy_fraction``; the first on an idle link always goes."""
    issued = np.zeros(len(src), np.bool_)
    m = 0
    for a in range(len(src)):
        m += int(kind[a] < EVICT and fits[a])
    subset = np.empty(m, np.int64)
    m = 0
    for a in range(len(src)):
        if kind[a] < EVICT and fits[a]:
            subset[m] = a
            m += 1
    # Per link (source * 4 + destination): its transfers and the smallest of them.
    count = np.zeros(16, np.int64)
    smallest = np.full(16, np.iinfo(np.int64).max, np.int64)
    for item in subset:
        code = src[item] * 4 + dst[item]
        count[code] += 1
        smallest[code] = min(smallest[code], size[item])
    # A link takes a few transfers per tick: only as many as could fit are ordered, kept in a
    # small sorted buffer per link while the candidates stream past.
    could_fit = np.zeros(16, np.int64)
    capacity = np.zeros(16, np.float64)
    for code in range(16):
        capacity[code] = link_gbps[code // 4, code % 4] * 1e9 * tick_s
        if count[code] and capacity[code] > 0:
            could_fit[code] = int(
                min(float(count[code]), capacity[code] // max(smallest[code], 1) + 2)
            )
    starts = np.zeros(17, np.int64)
    for code in range(16):
        starts[code + 1] = starts[code] + could_fit[code]
    best = np.empty(starts[16], np.int64)  # per link: positions in ``subset``, in order
    best_key = np.empty(starts[16], np.int64)
    held = np.zeros(16, np.int64)
    bits = np.empty(1, np.float64)
    as_int = bits.view(np.int64)
    for j in range(m):
        a = subset[j]
        code = src[a] * 4 + dst[a]
        k = could_fit[code]
        if k == 0:
            continue
        ahead = deadline[a] - now_s  # np.clip(ahead, -1e11, 1e11), NaN kept
        if ahead < -1e11:
            ahead = -1e11
        elif ahead > 1e11:
            ahead = 1e11
        bits[0] = cls[a] * 1e12 + ahead + 0.0
        key = as_int[0]
        if np.isnan(bits[0]):
            key = _MAX_KEY
        elif key < 0:
            key ^= _MAX_KEY
        base = starts[code]
        n_held = held[code]
        if n_held == k and key >= best_key[base + k - 1]:
            continue  # not better than the last kept (ties: the later position loses)
        slot = base + min(n_held, k - 1)
        while slot > base and best_key[slot - 1] > key:
            best_key[slot] = best_key[slot - 1]
            best[slot] = best[slot - 1]
            slot -= 1
        best_key[slot] = key
        best[slot] = j
        held[code] = min(n_held + 1, k)
    for code in range(16):
        if could_fit[code] == 0:
            continue
        busy = busy_fraction[code // 4, code % 4]
        before = 0.0
        for slot in range(starts[code], starts[code] + held[code]):
            a = subset[best[slot]]
            moved = float(size[a])
            used = busy + before / capacity[code]
            used_after = busy + (before + moved) / capacity[code]
            limit = demotion_busy_fraction if cls[a] == DEMOTION else 1.0
            first_on_idle = before == 0 and busy < limit
            issued[a] = (used < limit and used_after <= limit) or first_on_idle
            before += moved
    return issued


@_jit
def resolve(
    kind: np.ndarray,
    issued_on_links: np.ndarray,
    spilled: np.ndarray,
    required_up: np.ndarray,
    held: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """What the tick does: drops need no link; a required upgrade its link cannot carry this
    tick becomes an eviction too (the low-precision copy must not keep serving); held actions
    wait. Returns the mask of actions done, their kinds (spills as evictions), the mask of
    transfers started, and how many transfers wait for a later tick. ``spilled`` is updated in
    place."""
    n = len(kind)
    issued = np.empty(n, np.bool_)
    kinds = kind.copy()
    moving = np.zeros(n, np.bool_)
    deferred = 0
    for a in range(n):
        on_link = kind[a] < EVICT
        done = (not on_link) or issued_on_links[a]
        if required_up[a] and not done and not held[a]:
            spilled[a] = True
        if on_link and not done and not spilled[a]:
            deferred += 1
        done = done or spilled[a]
        if spilled[a]:
            kinds[a] = EVICT  # fetched again, smaller, later
        issued[a] = done and not held[a]
        moving[a] = issued[a] and on_link and not spilled[a]
    return issued, kinds, moving, deferred
