"""The score phase's kernels called from one compiled function (``policy.score.score_and_choose``,
the step's) against ``score`` then ``choose_targets``, which call them one by one: the same
``Scores`` and ``Targets``, bit for bit, step after step of a routed synthetic pool."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest

import policy.step as step_module
from policy.builder import execute_instantly
from policy.config import PolicyConfig
from policy.predict import Prediction
from policy.score import Scores, Targets, choose_targets, score, score_and_choose
from policy.snapshot import Snapshot
from policy.state import initial_state
from policy.static import Static
from policy.synthetic import MoELayout, Router, RoutingKnobs, routed_telemetry, synthetic_pool


def _same(name: str, fused: object, separate: object) -> None:
    if isinstance(separate, np.ndarray):
        assert isinstance(fused, np.ndarray), name
        assert fused.dtype == separate.dtype and fused.shape == separate.shape, name
        assert fused.tobytes() == separate.tobytes(), name  # bits, NaN included
    else:
        assert fused is separate or fused == separate, name


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"quality_weight_s": 0.05},
        {"hbm_headroom_fraction": 0.0, "hysteresis_multiple": 0.0, "min_dwell_s": 0.0},
    ],
)
def test_the_fused_call_scores_and_chooses_as_the_separate_ones(
    monkeypatch: pytest.MonkeyPatch, knobs: dict[str, float]
) -> None:
    layout = MoELayout(layers=6, experts=13, top_k=3, dense_per_layer=2)
    snapshot = synthetic_pool(layout, 3, 0.25, total_blocks=3 * layout.blocks + 7)
    config = PolicyConfig(**knobs)
    compared: list[tuple[Scores, Targets]] = []

    def both(
        snapshot: Snapshot, prediction: Prediction, static: Static, config: PolicyConfig
    ) -> tuple[Scores, Targets]:
        scores, targets = score_and_choose(snapshot, prediction, static, config)
        separate_scores = score(snapshot, prediction, static, config)
        separate_targets = choose_targets(snapshot, separate_scores, config)
        for field in fields(Scores):
            name = field.name
            _same(name, getattr(scores, name), getattr(separate_scores, name))
        for field in fields(Targets):
            name = field.name
            _same(name, getattr(targets, name), getattr(separate_targets, name))
        compared.append((scores, targets))
        return scores, targets

    monkeypatch.setattr(step_module, "score_and_choose", both)
    state = initial_state(snapshot, config)
    router = Router(layout, 3, RoutingKnobs(concurrency=2))
    layer_times = np.full(snapshot.telemetry.layer_time_s.shape, 2e-4)
    now_s = 0.0
    for tick in range(12):
        now_s += config.tick_s
        telemetry = routed_telemetry(snapshot, router, tick, now_s, layer_times)
        snapshot = replace(snapshot, telemetry=telemetry)
        plan, state = step_module.step(snapshot, state, config)
        snapshot = execute_instantly(snapshot, plan, now_s)
    assert len(compared) == 12
    # The steps did choose: some blocks in HBM, some not (the comparison is not of empty work).
    hbm = compared[-1][1].hbm_encoding
    assert (hbm >= 0).any() and (hbm < 0).any()
