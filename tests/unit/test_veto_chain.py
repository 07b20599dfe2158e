"""The veto's rare cases, where its compiled call (``policy._veto_chain.veto_rules``) stops and
Python goes on (``policy._veto_resume``): exact outcomes."""

from __future__ import annotations

import numpy as np
import pytest

import policy._veto_resume
from policy._veto_budget import sort_keys
from policy._veto_chain import enter
from policy.builder import BlockRow, PoolShape, build_snapshot
from policy.config import PolicyConfig
from policy.plan import RULE_CODES, Rule
from policy.predict import predict
from policy.score import choose_targets, score
from policy.snapshot import NONE
from policy.state import initial_state
from policy.static import static_for
from policy.veto import veto_and_refine
from tests.unit.test_policy import FULL, INT4, INT8, MB, active


def _proposed(rows, shape, config, proposal=None):
    snapshot = build_snapshot(rows, shape, active(shape, 0, 1.0))
    state = initial_state(snapshot, config)
    static = static_for(snapshot, None, state.shape)
    prediction = predict(snapshot, state, static, config)
    scores = score(snapshot, prediction, static, config)
    targets = choose_targets(snapshot, scores, config)
    if proposal is not None:
        targets.hbm_encoding[:] = proposal
    return snapshot, scores, targets, prediction


def _sorted_rounds(monkeypatch) -> list[int]:
    """Counts the rounds made by sorting (``_sorted_round``)."""
    calls: list[int] = []
    sorted_round = policy._veto_resume._sorted_round

    def counted(*args, **kwargs):
        calls.append(1)
        return sorted_round(*args, **kwargs)

    monkeypatch.setattr(policy._veto_resume, "_sorted_round", counted)
    return calls


def test_a_tier_over_its_budget_loses_its_least_valuable_blocks_and_gets_no_upgrade() -> None:
    # Two 10 MB blocks proposed at full precision in a 12 MB tier: the later one (the less
    # valuable) goes out, recorded with the tier's bytes and budget; the 2 MB then free do not
    # fit an upgrade of the other (already full).
    shape = PoolShape(hbm_bytes=(12 * MB,), layers=(4,))
    rows = [BlockRow("m/soon", 10 * MB, layer=1), BlockRow("m/late", 10 * MB, layer=3)]
    config = PolicyConfig(hbm_headroom_fraction=0, quality_budget=1.0)
    snapshot, scores, targets, prediction = _proposed(rows, shape, config, [FULL, FULL])
    assert targets.chosen_density[1] < targets.chosen_density[0]
    vetoed, upgraded = veto_and_refine(snapshot, scores, targets, prediction, config)
    full = int(snapshot.blocks.nbytes[0, FULL])
    budget = float(scores.hbm_budget_bytes[0])
    assert [a.tolist() for a in vetoed.rejections.arrays()] == [
        [1], [RULE_CODES.index(Rule.CAPACITY)], [FULL], [NONE], [2.0 * full], [budget]
    ]  # fmt: skip
    assert targets.hbm_encoding.tolist() == [FULL, NONE]
    assert targets.vetoed_out.tolist() == [False, True]
    assert vetoed.tier_bytes[0] == full
    assert upgraded.tolist() == []
    assert vetoed.cost[1] == 0.0
    assert vetoed.quality_cost == float(vetoed.cost.sum())


@pytest.mark.parametrize("first", [0, 1, 2])
def test_a_budget_choice_within_rounding_is_made_by_sorting(monkeypatch, first) -> None:
    # Four blocks at INT4, their budget set so that the excess is the running saving of the
    # ``first + 1`` best fixes (most saved per extra byte first), to the last bit: whether the
    # running sum reaches it is a matter of rounding, and the round sorts, as the sorting code
    # did (``searchsorted(cumsum(saving[order]), target) + 1``).
    shape = PoolShape(hbm_bytes=(60 * MB,), layers=(4,))
    sens = {"a": 0.05, "b": 0.2, "c": 0.15, "d": 0.02}
    rows = [
        BlockRow(f"m/{name}", 20 * MB, layer=1, sensitivity=[0, 0.002, 0.001, s, s])
        for name, s in sens.items()
    ]
    config = PolicyConfig(hbm_headroom_fraction=0)
    snapshot, scores, targets, prediction = _proposed(rows, shape, config, [INT4] * 4)
    b, static = snapshot.blocks, scores.static
    *_, cost, candidates, _, _ = enter(
        b.leased, b.hbm_encoding, targets.hbm_encoding.copy(), static.allowed, b.hbm_tier,
        b.nbytes, prediction.use_probability, b.sensitivity, static.budget_fallback,
        len(scores.hbm_budget_bytes), 1.0,
    )  # fmt: skip
    order = np.argsort(sort_keys(candidates[4]), kind="stable")
    running = np.cumsum(candidates[3][order])
    budget = float(cost.sum()) - float(running[first]) - 1e-15
    target = (float(cost.sum()) - budget) - 1e-15
    count = int(np.searchsorted(running, target)) + 1
    expected = sorted(candidates[0][order[:count]].tolist())
    sorted_rounds = _sorted_rounds(monkeypatch)
    config = PolicyConfig(hbm_headroom_fraction=0, quality_budget=budget)
    vetoed, _ = veto_and_refine(snapshot, scores, targets, prediction, config)
    assert sorted_rounds == [1]
    block, rule, proposed, fallback, *_ = (a.tolist() for a in vetoed.rejections.arrays())
    assert block == expected
    assert rule == [RULE_CODES.index(Rule.QUALITY_BUDGET)] * count
    assert proposed == [INT4] * count
    assert fallback == [INT8] * count
