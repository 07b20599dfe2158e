"""Compiled kernels of the observe phase (``policy.predict.observe``): router choices folded into
popularity, persistence and co-activation, with the arithmetic of the numpy code they replaced
(powers stay in numpy, between the kernels; the co-activation sample is numpy's, drawn here from
the generator's raw stream: see ``sample_pairs``).
"""

from __future__ import annotations

import numpy as np

from policy._pcg64 import pcg64_raw
from policy._select import _jit

LEARNED = 0  # ``learn_coactivation``'s outcome when it learned the step
_LOW32 = np.uint64(0xFFFFFFFF)
_DE_BRUIJN = np.uint64(0x03F79D71B4CB0A89)
# The lowest set bit of a word, from its isolated bit times the de Bruijn constant, top 6 bits.
_BIT_OF = np.zeros(64, np.int64)
for _bit in range(64):
    _BIT_OF[((1 << _bit) * 0x03F79D71B4CB0A89 % 2**64) >> 58] = _bit


@_jit
def fold_times(
    layer_time_s: np.ndarray,
    measured_s: np.ndarray,
    layer_time_decay: float,
    observed_concurrency: np.ndarray,
    concurrency: np.ndarray,
    popularity_decay: float,
) -> None:
    """Fold a tick's measured layer times (``nan``: not measured) and the concurrency of the
    running models into their decayed averages (``[M, P]`` and ``[M]``, in place)."""
    for i in range(layer_time_s.shape[0]):
        for j in range(layer_time_s.shape[1]):
            if not np.isnan(measured_s[i, j]):
                layer_time_s[i, j] += layer_time_decay * (measured_s[i, j] - layer_time_s[i, j])
        if concurrency[i] > 0:
            observed_concurrency[i] += popularity_decay * (concurrency[i] - observed_concurrency[i])


@_jit
def fold_routes(
    step_of: np.ndarray, flat: np.ndarray, n_ml: int, n_experts: int, predicted: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]:
    """Router choices, sorted by (step, flat (model, layer, expert) index) without repeats,
    counted per layer visited: the layers (flat (model, layer) indices, ascending), the steps
    visiting each, the choices of each expert there (``[layers, experts]``), and the previous
    prediction's true positives, false positives and false negatives (each layer's predicted
    set against its choices at its first visit)."""
    visits = np.zeros(n_ml, np.int64)
    first_step = np.full(n_ml, -1, np.int64)
    last_step = np.full(n_ml, -1, np.int64)
    for k in range(len(flat)):
        ml = flat[k] // n_experts
        if last_step[ml] != step_of[k]:
            visits[ml] += 1
            last_step[ml] = step_of[k]
            if first_step[ml] < 0:
                first_step[ml] = step_of[k]
    count = 0
    for ml in range(n_ml):
        count += int(visits[ml] > 0)
    visited = np.empty(count, np.int64)
    slot = np.full(n_ml, -1, np.int64)
    count = 0
    for ml in range(n_ml):
        if visits[ml] > 0:
            visited[count] = ml
            slot[ml] = count
            count += 1
    chosen = np.zeros((count, n_experts), np.int64)
    true_positive = 0
    used = 0
    for k in range(len(flat)):
        ml = flat[k] // n_experts
        chosen[slot[ml], flat[k] - ml * n_experts] += 1
        if step_of[k] == first_step[ml]:
            used += 1
            true_positive += int(predicted[flat[k]])
    predicted_count = 0
    for ml in visited:
        for e in range(n_experts):
            predicted_count += int(predicted[ml * n_experts + e])
    return (
        visited,
        visits[visited].astype(np.float64),
        chosen,
        true_positive,
        predicted_count - true_positive,
        used - true_positive,
    )


@_jit
def _distinct_in_place(values: np.ndarray, n: int, sparse: bool, words: int) -> int:
    """Write the distinct values of ``values[:n]`` (non-negative unless ``sparse``), ascending,
    to ``values[:count]``; return ``count``. By a sort when ``sparse``, else through a bitset of
    ``words`` 64-bit words spanning their range."""
    count = 0
    if sparse:
        ordered = np.sort(values[:n])
        for k in range(n):
            if k == 0 or ordered[k] != ordered[k - 1]:
                values[count] = ordered[k]
                count += 1
        return count
    bits = np.zeros(words, np.uint64)
    for k in range(n):
        bits[values[k] >> 6] |= np.uint64(1) << np.uint64(values[k] & 63)
    for i in range(words):
        word = bits[i]
        while word != 0:
            low = word & (~word + np.uint64(1))
            values[count] = i * 64 + _BIT_OF[(low * _DE_BRUIJN) >> np.uint64(58)]
            count += 1
            word ^= low
    return count


@_jit
def route_choices(
    route_step: np.ndarray,
    route_model: np.ndarray,
    route_layer: np.ndarray,
    route_expert: np.ndarray,
    n_layers: int,
    n_experts: int,
    predicted: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int, int]:
    """The router choices of a tick (``Telemetry.route_*``, at least one) as flat (model,
    layer, expert) indices, sorted by step, then index, without repeats; where each step after
    the first starts among them; and ``fold_routes`` of them (from ``visited`` on).

    PERF: one kernel for what numpy did in eight calls (the keys, a sort and its distinct
    values, a divmod, the step bounds) and ``fold_routes``; the keys are sorted through a
    bitset of their range when it is a few words per choice."""
    n = len(route_step)
    size = len(predicted)
    low = route_step.min()
    keys = np.empty(n, np.int64)
    least = np.iinfo(np.int64).max
    most = np.iinfo(np.int64).min
    for k in range(n):
        flat = (np.int64(route_model[k]) * n_layers + route_layer[k]) * n_experts
        keys[k] = (route_step[k] - low) * size + (flat + route_expert[k])
        least = min(least, keys[k])
        most = max(most, keys[k])
    sparse = least < 0 or most // 64 > 8 * n + 1024
    count = _distinct_in_place(keys, n, sparse, most // 64 + 1)
    step_of = np.empty(count, np.int64)
    flat_of = np.empty(count, np.int64)
    n_bounds = 0
    for k in range(count):
        step_of[k] = keys[k] // size  # np.divmod
        flat_of[k] = keys[k] - step_of[k] * size
        n_bounds += int(k > 0 and step_of[k] != step_of[k - 1])
    bounds = np.empty(n_bounds, np.int64)
    n_bounds = 0
    for k in range(1, count):
        if step_of[k] != step_of[k - 1]:
            bounds[n_bounds] = k
            n_bounds += 1
    visited, visits, chosen, tp, fp, fn = fold_routes(
        step_of, flat_of, size // n_experts, n_experts, predicted
    )
    return flat_of, bounds, visited, visits, chosen, tp, fp, fn


@_jit
def update_popularity(
    popularity: np.ndarray,
    layer_visits: np.ndarray,
    visited: np.ndarray,
    visits: np.ndarray,
    chosen: np.ndarray,
    keep: np.ndarray,
) -> None:
    """One decay per visit of a layer, toward the share of its visits choosing each expert
    (``popularity`` as ``[model * layer, expert]``, ``layer_visits`` flat; in place)."""
    for v in range(len(visited)):
        ml = visited[v]
        for e in range(popularity.shape[1]):
            share = chosen[v, e] / visits[v]
            popularity[ml, e] = keep[v] * popularity[ml, e] + (1 - keep[v]) * share
        layer_visits[ml] += visits[v]


@_jit
def persist(
    last: np.ndarray,
    current: np.ndarray,
    persistence: np.ndarray,
    n_experts: int,
    per_model: int,
    decay: float,
) -> np.ndarray:
    """One step of token-to-token persistence: per model, the share of the experts chosen at
    the last visit of each layer revisited now (``current``, sorted flat indices) that are
    chosen again, folded into ``persistence`` (in place). Returns the new last choices: those
    of the layers not revisited, and ``current`` (sorted)."""
    m = len(persistence)
    seen = np.zeros(m, np.int64)
    kept = np.zeros(m, np.int64)
    # Layers visited now (sorted: ``current`` is). PERF: an integer division a layer, not five
    # an entry of ``current`` and three of ``last`` (64-bit divisions, tens of cycles each):
    # both are sorted, a layer's entries are below its next one's first flat index (a million
    # blocks, captured inputs, trees alternating: 4.6 -> 2.6 ms, 16,384 blocks 0.058 -> 0.028
    # ms; policy_ab: observe phase 12.9 -> 10.6 ms at a million, 0.43 -> 0.42 ms at 16,384).
    layers = np.empty(len(current), np.int64)
    count = 0
    following = 0  # the first flat index past the layer of the last entry seen
    for k in range(len(current)):
        if count == 0 or current[k] >= following:
            ml = current[k] // n_experts
            layers[count] = ml
            count += 1
            following = (ml + 1) * n_experts
    stays = np.empty(len(last), np.bool_)
    j = 0
    c = 0
    n_layers = per_model // n_experts
    ml = -1
    model = 0
    revisited = False
    following = 0
    for k in range(len(last)):
        if ml < 0 or last[k] >= following:
            ml = last[k] // n_experts
            following = (ml + 1) * n_experts
            model = ml // n_layers
            while j < count and layers[j] < ml:  # both ascending: a merge walk
                j += 1
            revisited = j < count and layers[j] == ml
        stays[k] = not revisited
        if revisited:
            seen[model] += 1
            while c < len(current) and current[c] < last[k]:
                c += 1
            if c < len(current) and current[c] == last[k]:
                kept[model] += 1
    for i in range(m):
        if seen[i] > 0:
            persistence[i] += decay * (kept[i] / seen[i] - persistence[i])
    # The union of what stays and ``current``: both sorted, merged without repeats.
    stay = last[stays]
    merged = np.empty(len(stay) + len(current), np.int64)
    a = 0
    b = 0
    count = 0
    while a < len(stay) or b < len(current):
        if b == len(current) or (a < len(stay) and stay[a] < current[b]):
            value = stay[a]
            a += 1
        elif a == len(stay) or current[b] < stay[a]:
            value = current[b]
            b += 1
        else:
            value = stay[a]
            a += 1
            b += 1
        if count == 0 or merged[count - 1] != value:
            merged[count] = value
            count += 1
    return merged[:count].copy()


@_jit
def follower_runs(
    chosen: np.ndarray, n_layers: int, n_experts: int, given_layers: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """One model's choices of one step (sorted (layer, expert) indices): their layers and
    experts, the number of pairs each starts with the choices at the next layer (0 at the last
    learned layer), the running end of each one's pairs, the first choice of each layer, and
    the number of pairs."""
    layer = chosen // n_experts
    expert = chosen - layer * n_experts
    per_layer = np.zeros(n_layers + 1, np.int64)
    for i in range(len(layer)):
        per_layer[layer[i]] += 1
    offsets = np.empty(n_layers + 1, np.int64)
    running = 0
    for i in range(n_layers + 1):
        offsets[i] = running
        running += per_layer[i]
    repeat = np.empty(len(layer), np.int64)
    ends = np.empty(len(layer), np.int64)
    total = 0
    for i in range(len(layer)):
        repeat[i] = per_layer[layer[i] + 1] if layer[i] < given_layers else 0
        total += repeat[i]
        ends[i] = total
    return layer, expert, repeat, ends, offsets, total


@_jit
def learn_pairs(
    pairs: np.ndarray,
    given: np.ndarray,
    layer: np.ndarray,
    expert: np.ndarray,
    repeat: np.ndarray,
    ends: np.ndarray,
    offsets: np.ndarray,
    pair: np.ndarray,
    increment: float,
    pair_increment: float,
) -> None:
    """Add one step's co-activation: each choice with a next layer to ``given``, and each of
    the pairs ``pair`` (indices into the step's pairs, ascending) to ``pairs``."""
    for i in range(len(layer)):
        if layer[i] < given.shape[0]:
            given[layer[i], expert[i]] += increment
    # PERF: the cells first, then the increments, in the same order: the increments, cache
    # misses across the whole matrix, then overlap instead of each waiting on the search for
    # its pair's entry (57 x 256 x 256 cells, 4,096 pairs, caches flushed, loaded machine:
    # 174, 216, 186 -> 80, 85, 101 us).
    cells = np.empty(len(pair), np.int64)
    src = 0
    for k in range(len(pair)):
        while ends[src] <= pair[k]:  # np.searchsorted(ends, pair, side="right")
            src += 1
        within = pair[k] - (ends[src] - repeat[src])
        dst = offsets[layer[src] + 1] + within
        cells[k] = (layer[src] * pairs.shape[1] + expert[src]) * pairs.shape[2] + expert[dst]
    flat = pairs.reshape(-1)  # (C-contiguous, as policy.state makes it: a view)
    for k in range(len(cells)):
        flat[cells[k]] += pair_increment


@_jit
def sample_pairs(total: int, budget: int, raw: np.ndarray) -> tuple[np.ndarray, bool]:
    """``np.unique(np.random.default_rng(seed).integers(0, total, budget))`` for ``total`` below
    2**32, given ``raw = np.random.PCG64(seed).random_raw(k)``: numpy draws each value from the
    generator's 32-bit stream (the low, then the high half of each raw 64-bit output) by
    Lemire's multiply-and-reject (``buffered_bounded_lemire_uint32`` in numpy's
    ``distributions.c``). Returns ``(values, False)`` when ``raw`` runs out (rejections used
    more than it holds): the caller draws more and calls again.

    PERF: the sample is sorted and deduplicated through a bitset of the ``total`` pairs; with
    the generator seeded once a step, not once a model (16,384 blocks: 0.10 ms a step for the
    generator, its draws and numpy's sort of them)."""
    bound = np.uint64(total)
    threshold = (np.uint64(0x100000000) - bound) % bound  # (UINT32_MAX - rng) % rng_excl
    available = 2 * len(raw)
    used = 0
    draws = np.empty(budget, np.int64)
    for k in range(budget):
        while True:
            if used == available:
                return draws[:0], False
            word = raw[used >> 1]
            value = word & _LOW32 if used & 1 == 0 else word >> np.uint64(32)
            used += 1
            product = value * bound
            if product & _LOW32 >= threshold:
                break
        draws[k] = np.int64(product >> np.uint64(32))
    sparse = total // 64 > 16 * budget  # a sort costs less than the bitset
    return draws[: _distinct_in_place(draws, budget, sparse, (total + 63) // 64)], True


@_jit
def learn_coactivation(
    chosen: np.ndarray,
    n_layers: int,
    n_experts: int,
    pairs: np.ndarray,
    given: np.ndarray,
    increment: float,
    budget: int,
    seed: int,
) -> int:
    """One model's co-activation of one step (``chosen``: its sorted (layer, expert) indices),
    learned in place: ``follower_runs``, then ``learn_pairs`` over every pair, or over a
    sample of ``budget`` of them (``sample_pairs`` from ``np.random.PCG64(seed)``'s raw
    stream) with a scaled increment. Returns ``LEARNED``; else, having changed nothing, the
    number of pairs when it is 2**32 or more (``sample_pairs`` does not draw as numpy does
    there).

    PERF: the raw stream drawn here (``policy._pcg64``), not by numpy between two calls of
    this kernel (the first only to learn that a sample was needed; lockstep with the tree
    before, 16,384 blocks: observe phase x0.77, step x0.95)."""
    layer, expert, repeat, ends, offsets, total = follower_runs(
        chosen, n_layers, n_experts, given.shape[0]
    )
    if total > budget:
        if total > 0xFFFFFFFF:
            return total
        count = budget // 2 + 32  # enough for the sample but for a few rejections
        while True:
            pair, drawn = sample_pairs(total, budget, pcg64_raw(seed, count))
            if drawn:
                break
            count *= 2  # the same stream, longer
        pair_increment = increment * total / len(pair)
    else:
        pair = np.arange(total)
        pair_increment = increment
    learn_pairs(pairs, given, layer, expert, repeat, ends, offsets, pair, increment, pair_increment)
    return LEARNED
