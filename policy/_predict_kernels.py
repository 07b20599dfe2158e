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
    likewise; see ``policy.predict.predict``).

    PERF: the layers' weights and means here too (four numpy calls before). Each layer's
    divisors and prior share and each model's exponent once, not once an expert: two divisions
    an expert, four before (16,384 blocks, captured inputs, trees alternating: 0.119 -> 0.098
    ms; policy_ab, step ratio x0.984 at 16,384 blocks, x0.979 at a million, machine loaded)."""
    visit_weight = 1.0 - unvisited_weight
    n_models, n_layers = layer_sum.shape
    n_experts = popularity.shape[2]
    floor_of = np.empty((n_models, n_layers))
    evidence_of = np.empty((n_models, n_layers))
    prior_of = np.empty((n_models, n_layers))
    total_of = np.empty((n_models, n_layers))
    for i in range(n_models):
        for k in range(n_layers):
            weight = visit_weight[i, k]
            floor = weight if weight >= 1e-12 or np.isnan(weight) else 1e-12  # np.maximum
            floor_of[i, k] = floor
            evidence = weight / decay  # the effective number of visits behind the average
            evidence_of[i, k] = evidence
            prior_of[i, k] = prior_visits * (layer_sum[i, k] / n_experts / floor)  # its mean's
            total_of[i, k] = evidence + prior_visits
    inverse = np.empty(n_models)
    for i in range(n_models):
        inverse[i] = 1 / observed_concurrency[i]
    flat_popularity = popularity.reshape(-1)
    n = len(flat)
    base = np.empty(n)
    exponent = np.empty(n)
    for j in range(n):
        m, layer_j = model[j], layer[j]
        pop = 0.0
        if layer_visits[m, layer_j] > 0:
            pop = flat_popularity[flat[j]] / floor_of[m, layer_j]
        pop = (evidence_of[m, layer_j] * pop + prior_of[m, layer_j]) / total_of[m, layer_j]
        pop = 1.0 if pop > 1.0 else pop  # np.minimum(pop, 1.0): NaN stays NaN
        base[j] = 1 - pop
        exponent[j] = inverse[m]
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
    ``probability`` (damped for an idle model) and the predicted set."""
    for j in range(len(rows)):
        m = model[j]
        p = 1 - powered[j]
        if chosen_last[flat[j]]:
            other = persistence[m]
            p = p if p >= other or np.isnan(p) else other  # np.maximum
        if layer[j] == follow_layer[m]:
            other = follow[m, expert[j]]
            p = p if p >= other or np.isnan(p) else other
        value = p if active[m] else idle_use_probability * p
        probability[rows[j]] = value
        predicted[flat[j]] = value >= threshold


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
