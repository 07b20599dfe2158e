"""Compiled kernels of the predict phase (``policy.predict``).

They evaluate the numpy expressions they replaced in the same order of operations. Powers stay
in numpy (between the kernels): numpy evaluates ``**`` with its own vectorized routine, whose
last bit can differ from the C library's ``pow`` that compiled code calls, and plans must not
change.
"""

from __future__ import annotations

import numpy as np

from policy._select import _inline, _jit
from policy.snapshot import NONE


@_inline
def _remainder(a: float, b: float) -> float:
    """``np.mod(a, b)`` for ``b != 0``: ``fmod``, moved to the sign of ``b`` (numpy's
    ``npy_divmod``)."""
    mod: float = np.fmod(a, b)
    if mod != 0.0:
        if (b < 0) != (mod < 0):
            mod += b
    else:
        mod = np.copysign(0.0, b)
    return mod


@_jit
def block_times(
    layer_time_s: np.ndarray,
    period_s: np.ndarray,
    current_position: np.ndarray,
    concurrency: np.ndarray,
    model: np.ndarray,
    position: np.ndarray,
    idle_use_probability: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block: time until its position is next visited (``period_s`` of its model, at
    least 1e-12, for an idle model), and p(use) before expert evidence (1 for a running
    model, ``idle_use_probability`` for an idle one); and per model, whether it runs.

    PERF: the positions' start times and times until their next visit here too: seven numpy
    calls before, 12 us a step warm, several times that in the step, where numpy's code is
    cold (lockstep with the base tree, with ``fold_times``: predict phase x0.67 at 1,000
    blocks, x0.88 at 16,384)."""
    m, p = layer_time_s.shape
    active = np.empty(m, np.bool_)
    until = np.empty((m, p))
    for i in range(m):
        active[i] = current_position[i] != NONE and concurrency[i] > 0
        running = 0.0
        for j in range(p):  # the start of each position: np.cumsum(lt, axis=1) - lt
            running = layer_time_s[i, 0] if j == 0 else running + layer_time_s[i, j]
            until[i, j] = running - layer_time_s[i, j]
        origin = until[i, max(current_position[i], 0)]
        for j in range(p):
            since = until[i, j] - origin
            until[i, j] = _remainder(since, period_s[i]) if active[i] else period_s[i]
    n = len(model)
    time_to_next = np.empty(n)
    probability = np.empty(n)
    for r in range(n):
        time_to_next[r] = until[model[r], position[r]]
        probability[r] = 1.0 if active[model[r]] else idle_use_probability
    return time_to_next, probability, active


@_jit
def shrunk_popularity(
    runs: np.ndarray,
    model: np.ndarray,
    layer: np.ndarray,
    flat: np.ndarray,
    layer_visits: np.ndarray,
    unvisited_weight: np.ndarray,
    layer_sum: np.ndarray,
    popularity: np.ndarray,
    observed_concurrency: np.ndarray,
    decay: float,
    prior_visits: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per expert: ``1 - pop`` and ``1 / observed concurrency``, where ``pop`` is its decayed
    popularity corrected for the weight accumulated so far (``1 - unvisited_weight``, per
    layer) and shrunk toward its layer's mean (``layer_sum`` over its experts, corrected
    likewise; see ``policy.predict.predict``). ``runs``: ``Static.expert_runs``.

    PERF: the layers' weights and means here too (four numpy calls before). A run's divisors,
    prior share and exponent once, not once an expert: two divisions an expert, four before
    (16,384 blocks, captured inputs, trees alternating: 0.119 -> 0.098 ms), and per expert
    only its own cells, read in order along a run (0.098 -> 0.036 ms; with ``expert_probability``
    likewise, policy_ab: predict phase 0.70 -> 0.55 ms, step x0.953 at 16,384 blocks; 30.3 ->
    23.3 ms, step x0.965 at a million)."""
    n_experts = popularity.shape[2]
    flat_popularity = popularity.reshape(-1)
    n = len(flat)
    base = np.empty(n)
    exponent = np.empty(n)
    for r in range(len(runs) - 1):
        start, end = runs[r], runs[r + 1]
        m, layer_r = model[start], layer[start]
        weight = 1.0 - unvisited_weight[m, layer_r]
        floor = weight if weight >= 1e-12 or np.isnan(weight) else 1e-12  # np.maximum
        prior = prior_visits * (layer_sum[m, layer_r] / n_experts / floor)  # of the layer's mean
        evidence = weight / decay  # the effective number of visits behind the average
        total = evidence + prior_visits
        visited = layer_visits[m, layer_r] > 0
        inverse = 1 / observed_concurrency[m]
        offset = flat[start] - start
        for j in range(start, end):
            pop = flat_popularity[offset + j] / floor if visited else 0.0
            pop = (evidence * pop + prior) / total
            pop = 1.0 if pop > 1.0 else pop  # np.minimum(pop, 1.0): NaN stays NaN
            base[j] = 1 - pop
            exponent[j] = inverse
    return base, exponent


@_jit
def widened(
    powered: np.ndarray, model: np.ndarray, concurrency: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per expert: ``1 - per_sequence`` (``per_sequence = 1 - powered``) and the concurrency now
    (at least 1), as the base and exponent of the next power."""
    n = len(powered)
    base = np.empty(n)
    exponent = np.empty(n)
    for j in range(n):
        per_sequence = 1 - powered[j]
        base[j] = 1 - per_sequence
        exponent[j] = float(max(concurrency[model[j]], 1))
    return base, exponent


@_jit
def expert_probability(
    powered: np.ndarray,
    runs: np.ndarray,
    rows: np.ndarray,
    model: np.ndarray,
    layer: np.ndarray,
    expert: np.ndarray,
    flat: np.ndarray,
    chosen_last: np.ndarray,
    persistence: np.ndarray,
    follow_layer: np.ndarray,
    follow: np.ndarray,
    active: np.ndarray,
    idle_use_probability: float,
    threshold: float,
    probability: np.ndarray,
    predicted: np.ndarray,
) -> None:
    """Per expert: p(use) from ``1 - powered``, raised to its model's persistence if it was
    chosen at its layer's last visit and to its co-activation probability if its layer is the
    one after the current one (``follow_layer`` per model, -1 for none); written into
    ``probability`` (damped for an idle model) and the predicted set. ``runs``:
    ``Static.expert_runs``.

    PERF: by run, its model's and layer's terms once (16,384 blocks, captured inputs, trees
    alternating: 0.074 -> 0.043 ms; see ``shrunk_popularity`` for the step). ``widened`` by run
    was slower (0.025 -> 0.029 ms)."""
    for r in range(len(runs) - 1):
        start, end = runs[r], runs[r + 1]
        m = model[start]
        other = persistence[m]
        follows = layer[start] == follow_layer[m]
        running = active[m]
        row, cell, index = rows[start] - start, flat[start] - start, expert[start] - start
        for j in range(start, end):
            p = 1 - powered[j]
            if chosen_last[cell + j]:
                p = p if p >= other or np.isnan(p) else other  # np.maximum
            if follows:
                after = follow[m, index + j]
                p = p if p >= after or np.isnan(p) else after
            value = p if running else idle_use_probability * p
            probability[row + j] = value
            predicted[cell + j] = value >= threshold


@_jit
def coactivation_follow(
    chosen_last: np.ndarray,
    base: int,
    pairs: np.ndarray,
    given: np.ndarray,
    layer: int,
    out: np.ndarray,
) -> bool:
    """P(expert f at ``layer + 1`` | the experts chosen at the last visit of ``layer``, those of
    ``chosen_last[base:]`` seen before there), averaged over them, into ``out[:f]`` (one
    model's co-activation ``pairs`` and ``given``); False, ``out`` untouched, when there are
    none. As numpy's ``np.minimum(pairs[layer, chosen] / given[:, None], 1.0).mean(axis=0)``:
    summed over the chosen experts in order, then divided by their number."""
    count = 0
    for e in range(pairs.shape[1]):
        count += int(chosen_last[base + e] and given[layer, e] > 0)
    if count == 0:
        return False
    first = True
    for e in range(pairs.shape[1]):
        if not (chosen_last[base + e] and given[layer, e] > 0):
            continue
        seen = given[layer, e]
        for f in range(pairs.shape[2]):
            ratio = pairs[layer, e, f] / seen
            ratio = ratio if ratio <= 1.0 or np.isnan(ratio) else 1.0  # np.minimum
            out[f] = ratio if first else out[f] + ratio
        first = False
    for f in range(pairs.shape[2]):
        out[f] = out[f] / count
    return True
