"""The plan's ``demand_encoding``: the encoding a lease miss would be promoted at; exact."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest

from policy.builder import BlockRow, PoolShape, build_snapshot, idle_telemetry
from policy.config import PolicyConfig
from policy.plan import Rule
from policy.snapshot import NONE
from policy.state import initial_state
from policy.step import step
from pool.encoding import Precision

MB = 1 << 20
FULL, FP8, INT8, INT4, INT4Z = range(5)
UNKNOWN = float("inf")


def _plan(rows: list[BlockRow], budget: float = 0.25):
    shape = PoolShape(hbm_bytes=(40 * MB,), layers=(4,))
    tel = idle_telemetry(shape, 1.0)
    tel = replace(
        tel,
        current_position=np.zeros(1, np.int32),
        concurrency=np.ones(1, np.int32),
        layer_time_s=np.full(tel.layer_time_s.shape, 1e-3),
    )
    snapshot = build_snapshot(rows, shape, tel)
    config = PolicyConfig(hbm_headroom_fraction=0, quality_budget=budget)
    plan, _ = step(snapshot, initial_state(snapshot, config), config)
    return plan


# As in test_policy's budget test: four used blocks that HBM holds only at INT4; fixing "b"
# (0.2 -> 0.001 at INT8, 4.7 MB more) keeps the budget, and spare HBM then takes "b" to full
# precision: the plan costs 0.22 of 0.25. The budget's price is the best fix it left, "c"'s:
# 0.149 / 4.7 MB = 3.0e-8 per byte.
HOT = [
    BlockRow(f"m/{name}", 20 * MB, layer=1, sensitivity=[0, 0.002, 0.001, s, s])
    for name, s in {"a": 0.05, "b": 0.2, "c": 0.15, "d": 0.02}.items()
]
# Blocks too big for the HBM left (53 MB at INT4): the plan leaves them out; a miss on one
# would come at the encoding demand_encoding gives it.
COLD = [
    # Floor INT8: the densest it allows is INT8 (as small as FP8, less sensitive); its fix to
    # full precision saves 0.01 / 100 MB, below the price. INT8.
    BlockRow(
        "m/floor",
        200 * MB,
        layer=2,
        floor=Precision.INT8,
        sensitivity=[0, 0.02, 0.01, 0.1, 0.1],
    ),
    # Sensitivity never measured below full precision: full precision.
    BlockRow("m/unknown", 200 * MB, layer=2, sensitivity=[0, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN]),
    # Its fix (to FP8, drift-free) saves 0.02 / 46.8 MB = 4.1e-10 per byte: below the price.
    BlockRow("m/cheap", 200 * MB, layer=2, sensitivity=[0, 0.0, 0.001, 0.02, 0.02]),
    # Fixing it saves 0.099 / 46.8 MB = 2.0e-9 per byte, below the price: the veto would fix
    # others first. INT4.
    BlockRow("m/costly", 200 * MB, layer=2, sensitivity=[0, 0.002, 0.001, 0.1, 0.1]),
    # INT4 (5.0) saves 4.999 / 46.8 MB = 1.0e-7 per byte at INT8, above the price; INT8's fix
    # (0.001 / 100 MB) is not. INT8.
    BlockRow("m/fragile", 200 * MB, layer=2, sensitivity=[0, 0.002, 0.001, 5.0, 5.0]),
]


def test_demand_encoding_follows_floors_unknowns_and_the_budget_price() -> None:
    plan = _plan(HOT + COLD)
    assert [(r.block_id, r.rule) for r in plan.rejections] == [("m/b", Rule.QUALITY_BUDGET)]
    assert plan.metrics.quality_cost == pytest.approx(0.22)
    assert plan.target_hbm_encoding.tolist() == [INT4, FULL, INT4, INT4] + [NONE] * 5
    # The targeted blocks keep their target; the others as commented above.
    assert plan.demand_encoding.tolist() == [INT4, FULL, INT4, INT4, INT8, FULL, INT4, INT4, INT8]
    assert plan.demand_encoding.dtype == np.int8


def test_an_exhausted_budget_gives_the_least_harmful_allowed_encoding() -> None:
    # A leased copy at INT4 costing 0.5 on its own: the veto cannot keep the budget of 0.25
    # (it fixes every other block it can), so a miss would come at the least sensitive
    # encoding allowed: full precision, or FP8 for "m/cheap" (as harmless and smaller).
    leased = BlockRow(
        "m/leased",
        20 * MB,
        layer=1,
        sensitivity=[0, 0.002, 0.001, 0.5, 0.5],
        leased=True,
        hbm_encoding=INT4,
    )
    plan = _plan([leased, *COLD])
    assert plan.metrics.quality_cost == pytest.approx(0.5)
    assert plan.target_hbm_encoding.tolist() == [INT4] + [NONE] * 5
    assert plan.demand_encoding.tolist() == [INT4, FULL, FULL, FP8, FULL, FULL]


def test_without_a_budget_fix_the_headroom_decides() -> None:
    # A budget of 0.5: the four blocks at INT4 (0.42) need no fix; spare HBM takes "b" to full
    # precision (0.22), leaving 0.28 of headroom. A demand at INT4 that passes it is moved to
    # its next less sensitive encoding ("m/fragile": 5.0, to INT8, 0.001); one within it stays
    # ("m/costly": 0.1).
    plan = _plan(HOT + COLD, budget=0.5)
    assert plan.rejections == ()
    assert plan.metrics.quality_cost == pytest.approx(0.22)
    assert plan.demand_encoding.tolist() == [INT4, FULL, INT4, INT4, INT8, FULL, INT4, INT4, INT8]


def test_one_block_at_a_time_gives_the_same_encodings_and_a_pickled_plan_carries_them() -> None:
    # The plan computes demand encodings when asked (policy.demand): one block (a lease miss)
    # before the whole array, then the whole array, then each block again, all agree.
    expected = [INT4, FULL, INT4, INT4, INT8, FULL, INT4, INT4, INT8]
    plan = _plan(HOT + COLD)
    assert [plan.demand_encoding_of(i) for i in range(len(expected))] == expected
    with pytest.raises(IndexError, match="block rows"):
        plan.demand_encoding_of(len(expected))
    # Pickled, a plan ships the encodings (one byte a block), not the tables they come from.
    fresh = _plan(HOT + COLD)
    restored = pickle.loads(pickle.dumps(fresh.demand))
    assert restored.all().tolist() == expected
    assert restored.all().dtype == np.int8
    assert len(pickle.dumps(fresh.demand)) < len(pickle.dumps(np.zeros((9, 5))))
    assert plan.demand_encoding.tolist() == expected
    assert [plan.demand_encoding_of(i) for i in range(len(expected))] == expected
