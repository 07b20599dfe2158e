"""Observe and predict: fold telemetry into the policy state, then predict each block's use.

Dense blocks are used once per pass through their model's layer schedule: their time to next use
comes from the current position and the decayed time of each position. Experts are used at their
layer's next visit with a probability built from router history: decayed popularity per (layer,
expert), token-to-token persistence (an expert chosen at the last visit of its layer tends to be
chosen again), cross-layer co-activation learned online (which experts at layer l+1 follow the
ones just chosen at layer l), widened by the number of concurrent sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy._arrays import distinct, distinct_first
from policy.config import PolicyConfig
from policy.snapshot import NONE, Snapshot
from policy.state import Coactivation, PolicyState, PredictionQuality
from policy.static import Static


@dataclass(frozen=True)
class Prediction:
    time_to_next_use_s: np.ndarray  # [N] until the block's layer is next visited
    use_probability: np.ndarray  # [N] probability of use at that visit
    period_s: np.ndarray  # [M] one pass through each model's schedule


def observe(snapshot: Snapshot, state: PolicyState, config: PolicyConfig) -> PredictionQuality:
    """Fold this step's telemetry into ``state`` (in place); return this step's prediction
    quality (the previous step's predicted set against the experts then chosen)."""
    tel = snapshot.telemetry
    measured = ~np.isnan(tel.layer_time_s)
    if measured.any():
        lt = state.layer_time_s
        lt[measured] += config.layer_time_decay * (tel.layer_time_s[measured] - lt[measured])
    active = tel.concurrency > 0
    state.observed_concurrency[active] += config.popularity_decay * (
        tel.concurrency[active] - state.observed_concurrency[active]
    )
    state.steps += 1
    quality = PredictionQuality()
    if len(tel.route_step) == 0:
        return quality

    m, n_layers, n_experts = state.shape
    size = m * n_layers * n_experts
    flat = (tel.route_model.astype(np.int64) * n_layers + tel.route_layer) * n_experts
    flat += tel.route_expert
    steps = tel.route_step
    step_index = steps - steps.min()  # ticks hold few, consecutive steps
    key = distinct(step_index.astype(np.int64) * size + flat)  # by step, then (m, l, e)
    step_of, flat = np.divmod(key, size)
    ml = flat // n_experts
    visit = distinct(step_of * (m * n_layers) + ml)
    visit_step, visit_ml = np.divmod(visit, m * n_layers)
    visited_ml, first = distinct_first(visit_ml)

    # Prediction quality: the set predicted for each layer's next visit, against its first visit.
    first_step = np.full(m * n_layers, -1, np.int64)
    first_step[visited_ml] = visit_step[first]
    actual = flat[step_of == first_step[ml]]
    predicted = state.predicted.reshape(m * n_layers, n_experts)
    tp = int(state.predicted.reshape(-1)[actual].sum())
    quality.true_positive = tp
    quality.false_positive = int(predicted[visited_ml].sum()) - tp
    quality.false_negative = len(actual) - tp
    total = state.quality_total
    total.true_positive += tp
    total.false_positive += quality.false_positive
    total.false_negative += quality.false_negative

    # Popularity: one decay per visit of a layer, toward the share of visits choosing the expert.
    visits = np.bincount(visit_ml, minlength=m * n_layers)[visited_ml].astype(float)
    chosen = np.bincount(flat, minlength=size).reshape(m * n_layers, n_experts)[visited_ml]
    keep = (1 - config.popularity_decay) ** visits
    popularity = state.popularity.reshape(m * n_layers, n_experts)
    popularity[visited_ml] = keep[:, None] * popularity[visited_ml] + (1 - keep)[:, None] * (
        chosen / visits[:, None]
    )
    state.layer_visits.reshape(-1)[visited_ml] += visits

    # Persistence and co-activation, step by step (a tick holds few steps).
    last = state.last_selected
    for s in distinct(step_of):
        current = flat[step_of == s]
        current_ml = distinct(current // n_experts)
        if len(last):
            revisited = last[np.isin(last // n_experts, current_ml)]
            if len(revisited):
                hit = np.isin(revisited, current, assume_unique=True)
                per_model = n_layers * n_experts
                seen = np.bincount(revisited // per_model, minlength=m)
                kept = np.bincount(revisited[hit] // per_model, minlength=m)
                has = seen > 0
                state.persistence[has] += config.persistence_decay * (
                    kept[has] / seen[has] - state.persistence[has]
                )
            last = np.union1d(last[~np.isin(last // n_experts, current_ml)], current)
        else:
            last = current
        _learn_coactivation(state, current, n_layers, n_experts, config)
    state.last_selected = last
    return quality


def _learn_coactivation(
    state: PolicyState, current: np.ndarray, n_layers: int, n_experts: int, config: PolicyConfig
) -> None:
    """Add one step's (layer l, expert e) -> (layer l + 1, expert f) pairs, per model."""
    model_of = current // (n_layers * n_experts)
    for model in distinct(model_of).tolist():
        coact = state.coactivation[model]
        if coact is None:
            continue
        chosen = current[model_of == model] % (n_layers * n_experts)
        layer, expert = np.divmod(chosen, n_experts)  # sorted by layer
        coact.scale *= 1 - config.coactivation_decay
        increment = config.coactivation_decay / coact.scale
        per_layer = np.bincount(layer, minlength=n_layers + 1)
        offsets = np.cumsum(per_layer) - per_layer
        followers = per_layer[layer + 1]  # entries at l + 1 that follow each entry at l
        has_next = layer < coact.given.shape[0]
        # PERF: within one step and model each (layer, expert) and each pair occurs once, so
        # fancy-index += is exact; np.add.at took 1 ms a step for 58 layers x 32 experts.
        coact.given[layer[has_next], expert[has_next]] += increment
        repeat = np.where(has_next, followers, 0)
        ends = np.cumsum(repeat)
        total = int(ends[-1]) if len(ends) else 0
        if not total:
            coact.renormalize_if_needed()
            continue
        # Pair k is (entry src, its within-th follower). PERF: with many concurrent sequences a
        # step has tens of thousands of pairs (58 layers x 32 x 32); a bounded, evenly spread
        # sample with a scaled increment learns the same expectation at a bounded cost.
        budget = config.coactivation_pairs_per_step
        if total > budget:
            pair = distinct(np.random.default_rng(state.steps).integers(0, total, budget))
            pair_increment = increment * total / len(pair)
        else:
            pair = np.arange(total)
            pair_increment = increment
        src = np.searchsorted(ends, pair, side="right")
        within = pair - (ends[src] - repeat[src])
        dst = offsets[layer[src] + 1] + within
        coact.pairs[layer[src], expert[src], expert[dst]] += pair_increment
        coact.renormalize_if_needed()


def predict(
    snapshot: Snapshot, state: PolicyState, static: Static, config: PolicyConfig
) -> Prediction:
    """Time to next use and probability of use per block; records the predicted expert set."""
    tel, blocks = snapshot.telemetry, snapshot.blocks
    lt = state.layer_time_s
    m = lt.shape[0]
    period = np.maximum(lt.sum(axis=1), 1e-12)
    start = np.cumsum(lt, axis=1) - lt
    active = (tel.current_position != NONE) & (tel.concurrency > 0)
    now_pos = np.maximum(tel.current_position, 0)
    since = start - start[np.arange(m), now_pos][:, None]
    until = np.where(active[:, None], np.mod(since, period[:, None]), period[:, None])
    time_to_next = until[blocks.model, blocks.position]
    probability = np.where(active, 1.0, config.idle_use_probability)[blocks.model]

    _, n_layers, n_experts = state.shape
    rows = static.expert_rows
    state.predicted[:] = False
    if len(rows):
        model, layer, expert = static.expert_model, static.expert_layer, static.expert_index
        flat = static.expert_flat
        # An average that starts from zero is biased low until it has seen many visits; divide by
        # the weight it has accumulated so far (as Adam corrects its moment estimates).
        seen = state.layer_visits[model, layer]
        decay = config.popularity_decay
        weight = 1.0 - (1.0 - decay) ** seen
        pop = np.where(
            seen > 0, state.popularity.reshape(-1)[flat] / np.maximum(weight, 1e-12), 0.0
        )
        # Shrink toward the layer's mean (the share of its experts chosen per visit), a prior
        # worth ``prior_visits`` visits, so that a few observations do not read as certainty.
        layer_mean = state.popularity.mean(axis=2) / np.maximum(
            1.0 - (1.0 - decay) ** state.layer_visits, 1e-12
        )
        evidence = weight / decay  # the effective number of visits behind the average
        prior = layer_mean[model, layer]
        pop = (evidence * pop + config.prior_visits * prior) / (evidence + config.prior_visits)
        pop = np.minimum(pop, 1.0)
        observed = state.observed_concurrency[model]
        now = np.maximum(tel.concurrency[model], 1)
        per_sequence = 1 - (1 - pop) ** (1 / observed)
        p = 1 - (1 - per_sequence) ** now
        chosen_last = np.zeros(m * n_layers * n_experts, dtype=bool)
        chosen_last[state.last_selected] = True
        repeat = chosen_last[flat]
        p = np.where(repeat, np.maximum(p, state.persistence[model]), p)
        p = _apply_coactivation(p, state, model, layer, expert, tel.current_position, chosen_last)
        probability[rows] = np.where(active[model], p, config.idle_use_probability * p)
        state.predicted.reshape(-1)[flat] = probability[rows] >= config.predicted_set_threshold
    return Prediction(time_to_next, probability, period)


def _apply_coactivation(
    p: np.ndarray,
    state: PolicyState,
    model: np.ndarray,
    layer: np.ndarray,
    expert: np.ndarray,
    current_position: np.ndarray,
    chosen_last: np.ndarray,
) -> np.ndarray:
    """Raise p for experts at the layer after the current one, from the experts just chosen."""
    _, n_layers, n_experts = state.shape
    for index, coact in enumerate(state.coactivation):
        now_layer = int(current_position[index]) - 1
        if coact is None or not 0 <= now_layer < coact.given.shape[0]:
            continue
        base = (index * n_layers + now_layer) * n_experts
        chosen = np.flatnonzero(chosen_last[base : base + coact.pairs.shape[1]])
        chosen = chosen[coact.given[now_layer, chosen] > 0]  # experts seen before at this layer
        if not len(chosen):
            continue
        follow = coactivation_probability(coact, now_layer, chosen)
        rows = (model == index) & (layer == now_layer + 1)
        p[rows] = np.maximum(p[rows], follow[expert[rows]])
    return p


def coactivation_probability(coact: Coactivation, layer: int, chosen: np.ndarray) -> np.ndarray:
    """P(expert f at ``layer + 1`` | ``chosen`` at ``layer``), averaged over the chosen experts."""
    given = coact.given[layer, chosen]
    # Sampled pairs carry a scaled increment, so a ratio can pass 1: it is a probability.
    follow: np.ndarray = np.minimum(coact.pairs[layer, chosen] / given[:, None], 1.0).mean(axis=0)
    return follow
