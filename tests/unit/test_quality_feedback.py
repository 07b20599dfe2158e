"""policy.quality_feedback: realized drift from router telemetry against the plan's prediction,
and the veto's budget tightened by their ratio; exact."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from policy.builder import BlockRow, PoolShape, build_snapshot, idle_telemetry
from policy.config import PolicyConfig
from policy.quality_feedback import budget_config, window_drift
from policy.snapshot import NONE, Telemetry
from policy.state import QualityFeedback, initial_state
from policy.static import static_for
from policy.step import step
from pool.blocks import BlockKind

MB = 1 << 20
FULL, FP8, INT8, INT4, INT4Z = range(5)
# 10 MB of HBM for 18 MB of blocks at full precision: some go in at reduced precision.
SHAPE = PoolShape(hbm_bytes=(10 * MB,), layers=(2,), experts=(2,))


def _expert(layer: int, expert: int, sensitivity: float, **kw: object) -> BlockRow:
    return BlockRow(
        f"m/l{layer}/expert.{expert}",
        4 * MB,
        layer=layer,
        kind=BlockKind.EXPERT,
        expert=expert,
        sensitivity=[0, sensitivity, sensitivity, sensitivity, sensitivity],
        **kw,  # type: ignore[arg-type]
    )


# Layer 0's expert 1 sits in HBM at INT4 (drift 0.4 a use), layer 1's expert 0 is in flight at
# INT8 (0.1), layer 0's expert 0 is not in HBM (none), layer 1's expert 1 in HBM at INT4 (0.3)
# but the last plan did not target it (a demand promotion: left out).
ROWS = [
    BlockRow("m/attn0", 2 * MB, layer=0, sensitivity=[0, 0.01, 0.01, 0.01, 0.01]),
    _expert(0, 0, 0.5),
    _expert(0, 1, 0.4, hbm_encoding=INT4),
    _expert(1, 0, 0.1, in_flight_encoding=INT8),
    _expert(1, 1, 0.3, hbm_encoding=INT4),
]


def _telemetry(routes: list[tuple[int, int, int]], now_s: float = 1.0) -> Telemetry:
    tel = idle_telemetry(SHAPE, now_s)
    step_, layer, expert = (np.array(c) for c in zip(*routes, strict=True))
    return replace(
        tel,
        current_position=np.zeros(1, np.int32),
        concurrency=np.ones(1, np.int32),
        layer_time_s=np.full(tel.layer_time_s.shape, 1e-3),
        route_step=step_.astype(np.int64),
        route_model=np.zeros(len(step_), np.int32),
        route_layer=layer.astype(np.int32),
        route_expert=expert.astype(np.int32),
    )


def test_window_drift_counts_each_choice_once_at_the_encoding_it_has() -> None:
    # Token 5 chooses expert 1 at layer 0 (twice: two sequences) and expert 0 and 1 at layer 1;
    # token 6 chooses expert 1 at layer 0 again.
    routes = [(5, 0, 1), (5, 0, 1), (5, 1, 0), (5, 1, 1), (6, 0, 1)]
    snapshot = build_snapshot(ROWS, SHAPE, _telemetry(routes))
    state = initial_state(snapshot, PolicyConfig())
    static = static_for(snapshot, None, state.shape)
    block_of = np.full(4, NONE, np.int64)
    block_of[static.expert_flat] = static.expert_rows
    feedback = QualityFeedback(
        block_of,
        expected_by_layer=np.array([0.2, 0.05]),
        in_plan=np.array([True, True, True, True, False]),
        planned=True,
    )
    realized, predicted = window_drift(snapshot, state, feedback)
    # Realized: 0.4 (token 5, layer 0) + 0.1 (token 5, layer 1, in flight) + 0.4 (token 6);
    # layer 1's expert 1 was not in the plan. Predicted: three layer visits.
    assert realized == pytest.approx(0.9)
    assert predicted == pytest.approx(0.2 + 0.05 + 0.2)


def test_the_budget_is_tightened_by_the_ratio_never_loosened() -> None:
    snapshot = build_snapshot(ROWS, SHAPE, _telemetry([(0, 0, 0)]))
    off = PolicyConfig(quality_budget=0.02)
    state = initial_state(snapshot, off)
    static = static_for(snapshot, None, state.shape)
    assert budget_config(snapshot, state, static, off) is off  # off: the same config, no state
    assert state.quality_feedback is None

    on = PolicyConfig(quality_budget=0.02, quality_feedback_decay=0.5)
    assert budget_config(snapshot, state, static, on) is on  # no plan remembered: nothing folded
    fb = state.quality_feedback
    assert fb is not None and fb.ratio == 1.0
    # Realized twice the prediction, 0.004 of certain (not expert) drift: with one budget added
    # to both as a prior, r = 0.22 / 0.12 = 11 / 6 and (0.02 + 5 / 6 * 0.004) / r = 0.14 / 11.
    fb.realized_drift, fb.predicted_drift, fb.certain_drift = 0.2, 0.1, 0.004
    assert budget_config(snapshot, state, static, on).quality_budget == pytest.approx(0.14 / 11)
    fb.realized_drift = 0.05  # below the prediction: the configured budget
    assert budget_config(snapshot, state, static, on) is on
    fb.realized_drift = 0.0  # none of what was predicted realized
    assert budget_config(snapshot, state, static, on) is on
    fb.realized_drift, fb.certain_drift = 0.2, 0.03  # certain drift past the budget: as it is
    assert budget_config(snapshot, state, static, on) is on


def test_the_step_remembers_its_plan_and_folds_the_next_window() -> None:
    config = PolicyConfig(quality_budget=1.0, quality_feedback_decay=0.5, hbm_headroom_fraction=0)
    snapshot = build_snapshot(ROWS, SHAPE, _telemetry([(0, 0, 1)]))
    plan, state = step(snapshot, initial_state(snapshot, config), config)
    fb = state.quality_feedback
    assert fb is not None and fb.planned and fb.ratio == 1.0
    assert plan.metrics.quality_budget == 1.0
    assert (plan.target_hbm_encoding[1:] > FULL).any()  # experts at reduced precision
    # What it remembered: the plan's p(use) * sensitivity at its targets, per layer.
    target = plan.target_hbm_encoding
    sens = snapshot.blocks.sensitivity
    cost = np.where(target != NONE, plan.use_probability * sens[np.arange(len(ROWS)), target], 0.0)
    assert fb.expected_by_layer.tolist() == pytest.approx([cost[1] + cost[2], cost[3] + cost[4]])
    assert fb.certain_drift == pytest.approx(cost[0])
    assert fb.in_plan.tolist() == (target != NONE).tolist()

    # Next step (the same block arrays, as a controller passes them): the window's realized and
    # predicted drift are folded in, onto sums of 0 (decay 0.5).
    routes = [(1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    snapshot = replace(snapshot, telemetry=_telemetry(routes, 1.01))
    realized, predicted = window_drift(snapshot, state, fb)
    assert predicted == pytest.approx(fb.expected_by_layer.sum()) and predicted > 0  # 2 visits
    assert realized == pytest.approx(sum(sens[b, ROWS[b].hbm_encoding] for b in (2, 4)) + 0.1)
    _, state = step(snapshot, state, config)
    assert state.quality_feedback is fb
    assert (fb.realized_drift, fb.predicted_drift) == pytest.approx((realized, predicted))
    # New block arrays (a new calibration, say): the last plan's figures no longer apply, so
    # this window is not folded (the sums stay), and this step's plan is remembered.
    snapshot = build_snapshot(ROWS, SHAPE, _telemetry(routes, 1.02))
    _, state = step(snapshot, state, config)
    fb = state.quality_feedback
    assert fb is not None and (fb.realized_drift, fb.predicted_drift) == pytest.approx(
        (realized, predicted)
    )
    assert not fb.planned or fb.static is state.static


def test_off_by_default_and_the_plan_is_unchanged() -> None:
    snapshot = build_snapshot(ROWS, SHAPE, _telemetry([(0, 0, 1)]))
    config = PolicyConfig(quality_budget=0.5)
    assert config.quality_feedback_decay == 0
    plan, state = step(snapshot, initial_state(snapshot, config), config)
    assert state.quality_feedback is None
    assert plan.metrics.quality_budget == 0.5
