"""The observe and predict phases' kernels, called in turn from one compiled function each.

``observe_chain`` runs ``fold_times``, ``route_choices``, ``update_popularity``, ``persist`` and
``learn_coactivation`` (``policy._observe_kernels``) as ``policy.predict.observe`` calls them;
``predict_chain`` runs ``block_times``, ``coactivation_follow`` (for a state of one model) and
``use_probability`` (``policy._predict_kernels``). The kernels are unchanged. Only where
``NUMPY_POW8``: numpy's powers between the kernels are computed here by ``_pow8`` (the same
function numpy calls, so the same bits), and numpy's sums by ``policy._sum.pairwise_sum`` (numpy's
algorithm, the same bits).

PERF: each return from a kernel to Python found the interpreter's data evicted by the kernel
before; at 16,384 blocks the two phases spent about 110 us a step outside their kernels (glue
and dispatch), for 7 kernel calls and 5 numpy calls. ``policy_ab --base 1f8c9c1 --sizes
1000,16384 --steps 300`` (with ``policy.step``'s order and predict's positional sums), and the
other way round (the old files in this tree, the new as base: policy_ab favours this tree by
about 3 % with identical code): 16,384 blocks x0.955 and x1/1.014 (x0.970 unbiased), observe
+ predict 0.566 -> 0.483 ms and 0.586 -> 0.504 ms; 1,000 blocks x0.918 and x1/1.035 (x0.942),
0.138 -> 0.096 ms and 0.133 -> 0.103 ms. A million blocks (6 steps): x0.962, observe 9.2 ->
8.7 ms, predict 14.2 -> 13.8 ms.
"""

from __future__ import annotations

import numpy as np

from policy._observe_kernels import (
    LEARNED,
    fold_times,
    learn_coactivation,
    persist,
    route_choices,
    update_popularity,
)
from policy._predict_kernels import _pow8, block_times, coactivation_follow, use_probability
from policy._select import _inline, _jit
from policy._sum import pairwise_sum


@_inline
def _powers(base: float, exponent: np.ndarray) -> np.ndarray:
    """``base ** exponent`` (``exponent`` flat, C) as numpy computes it, by ``_pow8``."""
    n = len(exponent)
    lanes = (n + 7) // 8 * 8
    bases = np.full(lanes, base)
    exponents = np.ones(lanes)  # lanes past the end: any operands
    exponents[:n] = exponent
    out = np.empty(lanes)
    for k in range(0, n, 8):
        _pow8(bases, exponents, out, k)
    return out[:n]


@_jit
def observe_chain(
    layer_time_s: np.ndarray,
    measured_s: np.ndarray,
    layer_time_decay: float,
    observed_concurrency: np.ndarray,
    concurrency: np.ndarray,
    popularity_decay: float,
    route_step: np.ndarray,
    route_model: np.ndarray,
    route_layer: np.ndarray,
    route_expert: np.ndarray,
    popularity: np.ndarray,
    layer_visits: np.ndarray,
    predicted: np.ndarray,
    last_selected: np.ndarray,
    persistence: np.ndarray,
    persistence_decay: float,
    learn: bool,
    pairs: np.ndarray,
    given: np.ndarray,
    scale: float,
    coactivation_decay: float,
    budget: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int, float, int]:
    """``policy.predict.observe``'s kernels and numpy power over a tick's telemetry, the state
    updated in place; when ``learn``, also the co-activation of the only model (``pairs``,
    ``given``, ``scale``: its ``Coactivation``; ``seed``: the state's steps).

    Returns the choices' flat indices and step bounds (``route_choices``), the new last choices,
    the prediction's true positives, false positives and false negatives, the co-activation's
    new scale, and the number of steps whose co-activation was learned here (from the first;
    0 unless ``learn``): a step that ``learn_coactivation`` refuses (2**32 pairs or more), or
    whose scale would reach 0 (where Python's division raises), and those after it are left to
    the caller. With no choices, only ``fold_times``: empty indices, ``last_selected``."""
    fold_times(
        layer_time_s, measured_s, layer_time_decay, observed_concurrency, concurrency,
        popularity_decay,
    )  # fmt: skip
    if len(route_step) == 0:
        empty = np.empty(0, np.int64)
        return empty, empty, last_selected, 0, 0, 0, scale, 0
    m, n_layers, n_experts = popularity.shape
    per_model = n_layers * n_experts
    flat, bounds, visited, visits, chosen, tp, fp, fn = route_choices(
        route_step, route_model, route_layer, route_expert, n_layers, n_experts,
        predicted.reshape(-1),
    )  # fmt: skip
    # One decay per visit of a layer: ``(1 - popularity_decay) ** visits``.
    keep = _powers(1 - popularity_decay, visits)
    update_popularity(
        popularity.reshape(m * n_layers, n_experts), layer_visits.reshape(-1), visited, visits,
        chosen, keep,
    )  # fmt: skip
    # Persistence and co-activation, step by step (they touch different state).
    last = last_selected
    learned = 0
    n_steps = len(bounds) + 1
    for s in range(n_steps):
        start = 0 if s == 0 else bounds[s - 1]
        end = len(flat) if s == n_steps - 1 else bounds[s]
        current = flat[start:end]
        last = persist(last, current, persistence, n_experts, per_model, persistence_decay)
        if not learn or learned < s:
            continue
        # ``policy.predict._learn_coactivation`` of the only model (its choices: ``current``,
        # unless some are not in the grid's first model: Python's indexing raises there).
        after = scale * (1 - coactivation_decay)
        if after == 0.0 or current[0] < 0 or current[len(current) - 1] >= per_model:
            continue
        increment = coactivation_decay / after
        outcome = learn_coactivation(
            current, n_layers, n_experts, pairs, given, increment, budget, seed
        )
        if outcome != LEARNED:
            continue
        scale = after
        if scale < 1e-30:  # Coactivation.renormalize_if_needed
            pairs *= scale
            given *= scale
            scale = 1.0
        learned += 1
    return flat, bounds, last, tp, fp, fn, scale, learned


@_jit
def predict_chain(
    layer_time_s: np.ndarray,
    current_position: np.ndarray,
    concurrency: np.ndarray,
    block_model: np.ndarray,
    block_position: np.ndarray,
    runs: np.ndarray,
    rows: np.ndarray,
    model: np.ndarray,
    layer: np.ndarray,
    expert: np.ndarray,
    flat: np.ndarray,
    layer_visits: np.ndarray,
    popularity: np.ndarray,
    observed_concurrency: np.ndarray,
    decay: float,
    prior_visits: float,
    persistence: np.ndarray,
    one_model: bool,
    last_selected: np.ndarray,
    pairs: np.ndarray,
    given: np.ndarray,
    chosen_last: np.ndarray,
    follow_layer: np.ndarray,
    follow: np.ndarray,
    idle_use_probability: float,
    threshold: float,
    predicted: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``policy.predict.predict``'s kernels and numpy power: per block the time to next use and
    p(use), per model the period (numpy's ``lt.sum(axis=1)``, at least 1e-12, by
    ``pairwise_sum``); ``predicted`` rewritten. The last choices as a mask (``chosen_last``)
    and the co-activation's follow probabilities (``follow_layer``, ``follow``:
    ``policy.predict._coactivation``) are the caller's, or made here (from ``last_selected``
    and the model's ``pairs`` and ``given``, empty for a model without co-activation) for a
    state of ``one_model``. What depends on experts is read only where there are some
    (``rows``), with each layer's sum of popularity over its experts (numpy's
    ``np.add.reduce(popularity, axis=2)``, by ``pairwise_sum``).

    PERF: one function for one model or several (``policy.warmup`` compiles it with two). The
    sums in here, not numpy's called before it (two calls from Python, about 27 us at 16,384
    blocks with the caches evicted)."""
    period = np.empty(layer_time_s.shape[0])
    for i in range(len(period)):
        total = pairwise_sum(layer_time_s[i])
        period[i] = total if total >= 1e-12 or np.isnan(total) else 1e-12  # np.maximum
    time_to_next, probability, active = block_times(
        layer_time_s, period, current_position, concurrency, block_model, block_position,
        idle_use_probability,
    )  # fmt: skip
    flat_predicted = predicted.reshape(-1)
    flat_predicted[:] = False
    if len(rows) > 0:
        if one_model:
            n_experts = popularity.shape[2]
            chosen_last = np.zeros(len(flat_predicted), np.bool_)
            chosen_last[last_selected] = True
            follow_layer = np.full(1, -1, np.int64)
            follow = np.zeros((1, n_experts))
            now_layer = int(current_position[0]) - 1
            if 0 <= now_layer < given.shape[0] and coactivation_follow(
                chosen_last, now_layer * n_experts, pairs, given, now_layer, follow[0]
            ):
                follow_layer[0] = now_layer + 1
        layer_sum = np.empty(popularity.shape[:2])
        for i in range(popularity.shape[0]):
            for j in range(popularity.shape[1]):
                layer_sum[i, j] = pairwise_sum(popularity[i, j])
        # ``(1.0 - decay) ** layer_visits``
        unvisited_weight = _powers(1.0 - decay, layer_visits.reshape(-1)).reshape(
            layer_visits.shape
        )
        use_probability(
            runs, rows, model, layer, expert, flat, layer_visits, unvisited_weight, layer_sum,
            popularity, observed_concurrency, concurrency, decay, prior_visits, chosen_last,
            persistence, follow_layer, follow, active, idle_use_probability, threshold,
            probability, flat_predicted,
        )  # fmt: skip
    return time_to_next, probability, period
