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

from policy._arrays import distinct
from policy._observe_kernels import (
    LEARNED,
    fold_times,
    follower_runs,
    learn_coactivation,
    learn_pairs,
    persist,
    route_choices,
    update_popularity,
)
from policy._predict_chain import observe_chain, predict_chain
from policy._predict_kernels import (
    NUMPY_POW8,
    block_times,
    coactivation_follow,
    expert_probability,
    shrunk_popularity,
    widened,
)
from policy.config import PolicyConfig
from policy.snapshot import Snapshot
from policy.state import PolicyState, PredictionQuality
from policy.static import Static

# Placeholders of the compiled calls' arguments that are not read (no co-activation, no experts).
_NO_PAIRS = np.zeros((0, 0, 0))
_NO_GIVEN = np.zeros((0, 0))
_NO_MASK = np.zeros(0, bool)
_NO_LAYER = np.zeros(0, np.int64)
_NO_FOLLOW = np.zeros((0, 0))


@dataclass(frozen=True)
class Prediction:
    time_to_next_use_s: np.ndarray  # [N] until the block's layer is next visited
    use_probability: np.ndarray  # [N] probability of use at that visit
    period_s: np.ndarray  # [M] one pass through each model's schedule


def observe(snapshot: Snapshot, state: PolicyState, config: PolicyConfig) -> PredictionQuality:
    """Fold this step's telemetry into ``state`` (in place); return this step's prediction
    quality (the previous step's predicted set against the experts then chosen)."""
    if not NUMPY_POW8:
        return _observe_by_kernels(snapshot, state, config)
    # PERF: the kernels and the power in one compiled call (policy._predict_chain); with one
    # model (most pools), its co-activation too.
    tel = snapshot.telemetry
    m, n_layers, n_experts = state.shape
    coact = state.coactivation[0] if m == 1 else None
    learn = coact is not None
    state.steps += 1
    flat, bounds, last, tp, fp, fn, scale, learned = observe_chain(
        state.layer_time_s,
        tel.layer_time_s,
        config.layer_time_decay,
        state.observed_concurrency,
        tel.concurrency,
        config.popularity_decay,
        tel.route_step,
        tel.route_model,
        tel.route_layer,
        tel.route_expert,
        state.popularity,
        state.layer_visits,
        state.predicted,
        state.last_selected,
        state.persistence,
        config.persistence_decay,
        learn,
        coact.pairs if coact is not None else _NO_PAIRS,
        coact.given if coact is not None else _NO_GIVEN,
        coact.scale if coact is not None else 1.0,
        config.coactivation_decay,
        config.coactivation_pairs_per_step,
        state.steps,
    )
    if len(tel.route_step) == 0:
        return PredictionQuality()
    if coact is not None:
        coact.scale = scale
    state.last_selected = last
    total = state.quality_total
    total.true_positive += tp
    total.false_positive += fp
    total.false_negative += fn
    if learned <= len(bounds):  # steps left to learn (several models, or a rare case)
        for current in (np.split(flat, bounds) if len(bounds) else [flat])[learned:]:
            _learn_coactivation(state, current, n_layers, n_experts, config)
    return PredictionQuality(tp, fp, fn)


def _observe_by_kernels(
    snapshot: Snapshot, state: PolicyState, config: PolicyConfig
) -> PredictionQuality:
    """``observe``: its kernels one by one, numpy's power between them."""
    tel = snapshot.telemetry
    # PERF: one kernel for 11 small numpy calls, each costly with numpy's code cold (lockstep
    # with the base tree: observe phase x0.78 at 1,000 blocks, x0.89 at 16,384).
    fold_times(
        state.layer_time_s,
        tel.layer_time_s,
        config.layer_time_decay,
        state.observed_concurrency,
        tel.concurrency,
        config.popularity_decay,
    )
    state.steps += 1
    quality = PredictionQuality()
    if len(tel.route_step) == 0:
        return quality

    m, n_layers, n_experts = state.shape
    # By step, then (m, l, e). PERF: compiled passes over the choices (and over the visited
    # layers only); 2 bincounts over every (model, layer, expert) and ~30 small numpy calls
    # before, then eight numpy calls for the keys and their distinct values (route_choices).
    flat, bounds, visited, visits, chosen, tp, fp, fn = route_choices(
        tel.route_step,
        tel.route_model,
        tel.route_layer,
        tel.route_expert,
        n_layers,
        n_experts,
        state.predicted.reshape(-1),
    )
    quality.true_positive, quality.false_positive, quality.false_negative = tp, fp, fn
    total = state.quality_total
    total.true_positive += tp
    total.false_positive += fp
    total.false_negative += fn

    # Popularity: one decay per visit of a layer, toward the share of visits choosing the expert.
    keep = (1 - config.popularity_decay) ** visits
    update_popularity(
        state.popularity.reshape(m * n_layers, n_experts),
        state.layer_visits.reshape(-1),
        visited,
        visits,
        chosen,
        keep,
    )

    # Persistence and co-activation, step by step (a tick holds few steps).
    last = state.last_selected
    for current in np.split(flat, bounds) if len(bounds) else (flat,):
        last = persist(
            last,
            current,
            state.persistence,
            n_experts,
            n_layers * n_experts,
            config.persistence_decay,
        )
        _learn_coactivation(state, current, n_layers, n_experts, config)
    state.last_selected = last
    return quality


def _learn_coactivation(
    state: PolicyState, current: np.ndarray, n_layers: int, n_experts: int, config: PolicyConfig
) -> None:
    """Add one step's (layer l, expert e) -> (layer l + 1, expert f) pairs, per model.

    Pair k is (entry src, its within-th follower). PERF: with many concurrent sequences a step
    has tens of thousands of pairs (58 layers x 32 x 32); a bounded, evenly spread sample with
    a scaled increment learns the same expectation at a bounded cost. The sample is
    ``np.random.default_rng(state.steps).integers(0, pairs, budget)`` without repeats, drawn in
    the kernel from the generator's raw stream (``policy._observe_kernels.sample_pairs``,
    ``policy._pcg64``; line profiler, trees alternating: 16,384 blocks 0.64, 0.69 -> 0.52,
    0.46 ms a step; a million blocks, 8 models learning, 5.0, 6.9 -> 3.4, 3.2 ms).
    """
    per_model = n_layers * n_experts
    first, last = int(current[0]) // per_model, int(current[-1]) // per_model
    if first == last:  # PERF: one model's choices (most ticks): no search (three numpy calls)
        starts = [0, len(current)]
    else:
        starts = np.searchsorted(current, np.arange(first, last + 2) * per_model).tolist()
    budget = config.coactivation_pairs_per_step
    for model in range(first, last + 1):
        coact = state.coactivation[model]
        begin, end = starts[model - first], starts[model - first + 1]
        if coact is None or begin == end:
            continue
        chosen = current[begin:end] - model * per_model  # sorted by layer
        coact.scale *= 1 - config.coactivation_decay
        increment = config.coactivation_decay / coact.scale
        outcome = learn_coactivation(
            chosen, n_layers, n_experts, coact.pairs, coact.given, increment, budget, state.steps
        )
        if outcome != LEARNED:  # 2**32 pairs or more: numpy draws them its other way
            layer, expert, repeat, ends, offsets, total = follower_runs(
                chosen, n_layers, n_experts, coact.given.shape[0]
            )
            pair = distinct(np.random.default_rng(state.steps).integers(0, total, budget))
            learn_pairs(
                coact.pairs,
                coact.given,
                layer,
                expert,
                repeat,
                ends,
                offsets,
                pair,
                increment,
                increment * total / len(pair),
            )
        coact.renormalize_if_needed()


def predict(
    snapshot: Snapshot, state: PolicyState, static: Static, config: PolicyConfig
) -> Prediction:
    """Time to next use and probability of use per block; records the predicted expert set."""
    if not NUMPY_POW8:
        return _predict_by_kernels(snapshot, state, static, config)
    # PERF: the kernels, the power and numpy's sums in one compiled call
    # (policy._predict_chain). With one model, its co-activation's part too.
    tel, blocks = snapshot.telemetry, snapshot.blocks
    rows = static.expert_rows
    one_model = len(state.coactivation) == 1  # its co-activation's part made in the call
    pairs, given = _NO_PAIRS, _NO_GIVEN
    chosen_last, follow_layer, follow = _NO_MASK, _NO_LAYER, _NO_FOLLOW
    if one_model:
        coact = state.coactivation[0]
        if coact is not None:
            pairs, given = coact.pairs, coact.given
    elif len(rows):
        m, n_layers, n_experts = state.shape
        chosen_last = np.zeros(m * n_layers * n_experts, dtype=bool)
        chosen_last[state.last_selected] = True
        follow_layer, follow = _coactivation(state, tel.current_position, chosen_last)
    time_to_next, probability, period = predict_chain(
        state.layer_time_s,
        tel.current_position,
        tel.concurrency,
        blocks.model,
        blocks.position,
        static.expert_runs,
        rows,
        static.expert_model,
        static.expert_layer,
        static.expert_index,
        static.expert_flat,
        state.layer_visits,
        state.popularity,
        state.observed_concurrency,
        config.popularity_decay,
        config.prior_visits,
        state.persistence,
        one_model,
        state.last_selected,
        pairs,
        given,
        chosen_last,
        follow_layer,
        follow,
        config.idle_use_probability,
        config.predicted_set_threshold,
        state.predicted,
    )
    return Prediction(time_to_next, probability, period)


def _predict_by_kernels(
    snapshot: Snapshot, state: PolicyState, static: Static, config: PolicyConfig
) -> Prediction:
    """``predict``: its kernels one by one, numpy's powers between them."""
    tel, blocks = snapshot.telemetry, snapshot.blocks
    lt = state.layer_time_s
    period = np.maximum(lt.sum(axis=1), 1e-12)
    time_to_next, probability, active = block_times(
        lt,
        period,
        tel.current_position,
        tel.concurrency,
        blocks.model,
        blocks.position,
        config.idle_use_probability,
    )

    m, n_layers, n_experts = state.shape
    rows = static.expert_rows
    state.predicted[:] = False
    if len(rows):
        model, layer, flat = static.expert_model, static.expert_layer, static.expert_flat
        # An average that starts from zero is biased low until it has seen many visits; divide by
        # the weight it has accumulated so far (as Adam corrects its moment estimates). Shrink
        # it toward the layer's mean (the share of its experts chosen per visit), a prior worth
        # ``prior_visits`` visits, so that a few observations do not read as certainty.
        decay = config.popularity_decay
        # PERF: compiled passes; the powers are numpy's (see the kernels' module), here between
        # the kernels (in ``use_probability`` where numpy's is SVML's: ``predict``); 16 numpy
        # passes over every expert before. The layers' sums are np.mean's, less its wrapper.
        runs = static.expert_runs
        unvisited_weight = (1.0 - decay) ** state.layer_visits
        layer_sum = np.add.reduce(state.popularity, axis=2)
        chosen_last = np.zeros(m * n_layers * n_experts, dtype=bool)
        chosen_last[state.last_selected] = True
        follow_layer, follow = _coactivation(state, tel.current_position, chosen_last)
        base, exponent = shrunk_popularity(
            runs,
            model,
            layer,
            flat,
            state.layer_visits,
            unvisited_weight,
            layer_sum,
            state.popularity,
            state.observed_concurrency,
            decay,
            config.prior_visits,
        )
        # One sequence's chance, then widened to the sequences running now.
        base, exponent = widened(base**exponent, model, tel.concurrency)
        powered = base**exponent
        expert_probability(
            powered,
            runs,
            rows,
            model,
            layer,
            static.expert_index,
            flat,
            chosen_last,
            state.persistence,
            follow_layer,
            follow,
            active,
            config.idle_use_probability,
            config.predicted_set_threshold,
            probability,
            state.predicted.reshape(-1),
        )
    return Prediction(time_to_next, probability, period)


def _coactivation(
    state: PolicyState, current_position: np.ndarray, chosen_last: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per model, the layer after the current one (-1 for none) and the probability of each of
    its experts following the experts just chosen at the current layer (averaged over those
    seen before at this layer: ``policy._predict_kernels.coactivation_follow``).

    PERF: a kernel a model for six numpy calls (16,384 blocks, line profiler, trees in turn:
    0.097 -> 0.032 ms a step)."""
    m, n_layers, n_experts = state.shape
    follow_layer = np.full(m, -1, np.int64)
    follow = np.zeros((m, n_experts))
    for index, coact in enumerate(state.coactivation):
        now_layer = int(current_position[index]) - 1
        if coact is None or not 0 <= now_layer < coact.given.shape[0]:
            continue
        base = (index * n_layers + now_layer) * n_experts
        if coactivation_follow(
            chosen_last, base, coact.pairs, coact.given, now_layer, follow[index]
        ):
            follow_layer[index] = now_layer + 1
    return follow_layer, follow
