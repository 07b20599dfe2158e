"""The control step, stepped with a fake clock; exact outcomes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.builder import BlockRow, PoolShape, build_snapshot, execute_instantly, idle_telemetry
from policy.config import PolicyConfig
from policy.plan import Priority, Rule
from policy.snapshot import HOST, NONE, STORAGE
from policy.state import initial_state
from policy.step import step
from pool.blocks import BlockKind
from pool.encoding import Encoding, Precision

MB = 1 << 20
FULL, FP8, INT8, INT4, INT4Z = range(5)


def active(shape: PoolShape, position: int, now_s: float, layer_time_s: float = 1e-3):
    tel = idle_telemetry(shape, now_s)
    return replace(
        tel,
        current_position=np.full(len(shape.layers), position, np.int32),
        concurrency=np.ones(len(shape.layers), np.int32),
        layer_time_s=np.full(tel.layer_time_s.shape, layer_time_s),
    )


def to_hbm(plan):
    return [(t.block_id, t.priority) for t in plan.transfers if t.destination.value == "hbm"]


def run(rows, shape, config, position=0, now_s=1.0):
    snapshot = build_snapshot(rows, shape, active(shape, position, now_s))
    return step(snapshot, initial_state(snapshot, config), config)


def test_imminent_block_is_promoted_before_a_speculative_one() -> None:
    shape = PoolShape(hbm_bytes=(64 * MB,), layers=(40,))
    rows = [BlockRow("m/late", 8 * MB, layer=30), BlockRow("m/soon", 8 * MB, layer=1)]
    # 12 GB/s from storage for 1 ms: a 12 MB budget, room for one 8 MB block per tick.
    config = PolicyConfig(tick_s=1e-3, min_dwell_s=0)
    plan, state = run(rows, shape, config, position=0)
    assert to_hbm(plan) == [("m/soon", Priority.IMMINENT)]
    # "late" waits for the next tick, and so does one of the two storage -> host copies.
    assert plan.metrics.deferred_transfers == 2
    # "soon" is promoting to HBM; "late" only got its host copy this tick (NVMe to host).
    assert [(t.block_id, t.to_state.value, t.via_promoting) for t in plan.transitions] == [
        ("m/late", "warm", False),
        ("m/soon", "premium", True),
    ]
    # Next tick, with "soon" landed, the speculative block goes as a prefetch.
    snapshot = execute_instantly(build_snapshot(rows, shape, active(shape, 0, 1.0)), plan, 1.0)
    snapshot = replace(snapshot, telemetry=active(shape, 0, 1.001))
    plan, _ = step(snapshot, state, config)
    assert to_hbm(plan) == [("m/late", Priority.PREFETCH)]


def test_a_waiting_lease_goes_first() -> None:
    shape = PoolShape(hbm_bytes=(64 * MB,), layers=(40,))
    rows = [
        BlockRow("m/soon", 8 * MB, layer=1),
        BlockRow("m/wanted", 8 * MB, layer=30, demand=True),
    ]
    plan, _ = run(rows, shape, PolicyConfig(tick_s=1e-3))
    assert to_hbm(plan) == [("m/wanted", Priority.DEMAND)]


def test_veto_stops_a_floor_violation_and_picks_the_fallback() -> None:
    # HBM for both blocks at INT8 but not at full precision: scoring proposes the densest
    # encoding (INT4) for both; the veto lifts the INT8-floor block to INT8.
    shape = PoolShape(hbm_bytes=(12 * MB,), layers=(4,))
    # FP8 and INT8 take the same bytes; INT8 is the less sensitive of the two here.
    rows = [
        BlockRow(
            "m/a", 10 * MB, layer=1, floor=Precision.INT8, sensitivity=[0, 0.02, 0.01, 0.1, 0.1]
        ),
        BlockRow("m/b", 10 * MB, layer=2),
    ]
    plan, _ = run(rows, shape, PolicyConfig(hbm_headroom_fraction=0, quality_budget=1.0))
    (rejection,) = plan.rejections
    assert (rejection.block_id, rejection.rule) == ("m/a", Rule.FLOOR)
    assert (rejection.proposed.name, rejection.fallback.name) == ("int4", "int8")
    assert rejection.numbers == {"proposed_bits": 4.0, "floor_bits": 8.0}
    assert plan.target_hbm_encoding.tolist() == [INT8, INT4]


def test_veto_falls_back_to_the_fallback_copy_when_the_floor_does_not_fit() -> None:
    shape = PoolShape(hbm_bytes=(4 * MB,), layers=(4,))
    rows = [BlockRow("m/a", 10 * MB, layer=1, floor=Precision.FULL)]
    plan, _ = run(rows, shape, PolicyConfig(hbm_headroom_fraction=0))
    (rejection,) = plan.rejections
    assert (rejection.rule, rejection.proposed.name, rejection.fallback) == (
        Rule.FLOOR,
        "int4",
        None,
    )
    assert plan.target_hbm_encoding.tolist() == [NONE]  # served from its fallback copy, not dropped
    assert plan.target_fallback_level.tolist() == [HOST]


def test_veto_keeps_the_quality_budget_with_the_cheapest_fixes() -> None:
    # Four blocks, all used; HBM fits them only at INT4 (4 x 5.3 MB of 40 MB; full is 20 MB
    # each). At INT4 they cost 0.42 against a budget of 0.25. Fixing "b" (0.2 -> 0.001 at INT8,
    # 4.7 MB more) saves the most per extra byte and is enough: it alone is vetoed.
    shape = PoolShape(hbm_bytes=(40 * MB,), layers=(4,))
    sens = {"a": 0.05, "b": 0.2, "c": 0.15, "d": 0.02}
    rows = [
        BlockRow(f"m/{name}", 20 * MB, layer=1, sensitivity=[0, 0.002, 0.001, s, s])
        for name, s in sens.items()
    ]
    config = PolicyConfig(hbm_headroom_fraction=0, quality_budget=0.25)
    plan, _ = run(rows, shape, config)
    assert [(r.block_id, r.rule, r.proposed.name, r.fallback.name) for r in plan.rejections] == [
        ("m/b", Rule.QUALITY_BUDGET, "int4", "int8")
    ]
    assert plan.rejections[0].numbers == {"block_cost": 0.2, "budget": 0.25}
    assert plan.target_hbm_encoding.tolist() == [INT4, INT8, INT4, INT4]
    assert plan.metrics.quality_cost == pytest.approx(0.05 + 0.001 + 0.15 + 0.02)


def test_without_the_veto_budget_the_same_pool_would_overrun() -> None:
    shape = PoolShape(hbm_bytes=(40 * MB,), layers=(4,))
    rows = [
        BlockRow(f"m/{i}", 20 * MB, layer=1, sensitivity=[0, 0.002, 0.001, 0.1, 0.1])
        for i in range(4)
    ]
    plan, _ = run(rows, shape, PolicyConfig(hbm_headroom_fraction=0, quality_budget=1.0))
    assert plan.rejections == ()
    assert plan.metrics.quality_cost == pytest.approx(0.4)  # the budget binds only when set


def test_hysteresis_stops_oscillation_under_alternating_demand() -> None:
    # Full precision only, HBM for one block of two: a pure placement contest.
    shape = PoolShape(
        hbm_bytes=(10 * MB,),
        layers=(40,),
        encodings=(Encoding(),),
        size_ratios=np.ones(1),
        decode_gbps=np.full(1, np.inf),
    )
    rows = [BlockRow("m/a", 8 * MB, layer=0), BlockRow("m/b", 8 * MB, layer=20)]

    def moves(config: PolicyConfig) -> int:
        snapshot = build_snapshot(rows, shape, active(shape, 0, 0.0))
        state = initial_state(snapshot, config)
        count, now = 0, 0.0
        for tick in range(20):
            now += 0.1
            # Demand alternates: the model is just before "a", then just before "b".
            position = 0 if tick % 2 == 0 else 20
            snapshot = replace(snapshot, telemetry=active(shape, position, now))
            plan, state = step(snapshot, state, config)
            count += sum(
                1
                for t in plan.transitions
                if t.target.tier.value == "hbm" or t.source.tier.value == "hbm"
            )
            snapshot = execute_instantly(snapshot, plan, now)
        return count

    assert moves(PolicyConfig(hysteresis_multiple=0, min_dwell_s=0, imminence_s=0.005)) >= 19
    assert moves(PolicyConfig(imminence_s=0.005)) == 1  # the first placement, then it stays


def test_a_leased_block_is_never_demoted() -> None:
    shape = PoolShape(hbm_bytes=(10 * MB,), layers=(40,))
    rows = [
        BlockRow("m/leased", 8 * MB, layer=39, leased=True, hbm_encoding=FULL, fallback_level=HOST),
        BlockRow("m/hot", 8 * MB, layer=0, demand=True),
    ]
    plan, _ = run(rows, shape, PolicyConfig(), position=0)
    assert plan.target_hbm_encoding.tolist()[0] == FULL
    assert all(t.block_id != "m/leased" for t in plan.transitions)


def test_the_veto_restores_a_leased_copy_a_proposal_touched() -> None:
    from policy.predict import predict
    from policy.score import choose_targets, score
    from policy.static import static_for
    from policy.veto import veto

    shape = PoolShape(hbm_bytes=(10 * MB,), layers=(4,))
    rows = [
        BlockRow("m/leased", 8 * MB, layer=1, leased=True, hbm_encoding=FULL, fallback_level=HOST)
    ]
    snapshot = build_snapshot(rows, shape, active(shape, 0, 1.0))
    config = PolicyConfig()
    state = initial_state(snapshot, config)
    static = static_for(snapshot, None, state.shape)
    prediction = predict(snapshot, state, static, config)
    scores = score(snapshot, prediction, static, config)
    targets = choose_targets(snapshot, scores, config)
    targets.hbm_encoding[0] = NONE  # a proposal that would evict the leased copy
    result = veto(snapshot, scores, targets, prediction, config)
    assert targets.hbm_encoding.tolist() == [FULL]
    assert result.rejections.arrays()[1].tolist() == [0]  # Rule.LEASED is the first rule


def test_stale_transfers_are_cancelled() -> None:
    shape = PoolShape(hbm_bytes=(4 * MB,), layers=(4,))
    rows = [BlockRow("m/a", 10 * MB, layer=1, in_flight_encoding=FULL)]
    plan, _ = run(rows, shape, PolicyConfig(hbm_headroom_fraction=0))
    assert [(c.block_id, c.encoding.name) for c in plan.cancellations] == [("m/a", "full")]


def test_bad_config_values_name_the_field() -> None:
    with pytest.raises(pydantic.ValidationError, match="hbm_headroom_fraction"):
        PolicyConfig(hbm_headroom_fraction=1.5)
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        PolicyConfig(hysteresis=2)  # type: ignore[call-arg]
    with pytest.raises(
        pydantic.ValidationError, match=r"imminent_horizon_s \(0.001\) must be >= safety_margin_s"
    ):
        PolicyConfig(imminent_horizon_s=0.001, safety_margin_s=0.002)


def test_prediction_learns_a_fixed_routing_pattern() -> None:
    shape = PoolShape(hbm_bytes=(64 * MB,), layers=(2,), experts=(8,))
    rows = [
        BlockRow(f"m/l{layer}.e{e}", MB, layer=layer, kind=BlockKind.EXPERT, expert=e)
        for layer in range(2)
        for e in range(8)
    ]
    config = PolicyConfig(popularity_decay=0.5)
    snapshot = build_snapshot(rows, shape, active(shape, 1, 0.0))
    state = initial_state(snapshot, config)
    for tick in range(8):
        tel = replace(
            active(shape, 1, 0.01 * tick),
            route_step=np.full(4, tick, np.int64),
            route_model=np.zeros(4, np.int32),
            route_layer=np.array([0, 0, 1, 1], np.int32),
            route_expert=np.array([2, 5, 3, 7], np.int32),
        )
        plan, state = step(replace(snapshot, telemetry=tel), state, config)
    assert (plan.metrics.prediction_precision, plan.metrics.prediction_recall) == (1.0, 1.0)
    used = {"m/l0.e2", "m/l0.e5", "m/l1.e3", "m/l1.e7"}
    high = {rows[i].block_id for i in np.flatnonzero(plan.use_probability > 0.9)}
    assert high == used


@st.composite
def pools(draw):
    n = draw(st.integers(1, 25))
    hbm = draw(st.integers(1, 200)) * MB
    rows, pinned = [], 0
    for i in range(n):
        size = draw(st.integers(1, 60)) * MB
        leased = draw(st.booleans()) and pinned + size <= hbm * 0.9
        resident = leased or draw(st.booleans())
        encoding = FULL if leased else draw(st.sampled_from([NONE, FULL, INT8, INT4]))
        pinned += size if leased else 0
        rows.append(
            BlockRow(
                f"m/b{i}",
                size,
                layer=draw(st.integers(0, 7)),
                floor=draw(st.sampled_from(list(Precision))),
                leased=leased,
                demand=draw(st.booleans()),
                hbm_encoding=encoding if resident else NONE,
                fallback_level=draw(st.sampled_from([HOST, STORAGE])),
                sensitivity=[0, *draw(st.lists(st.floats(0, 0.1), min_size=4, max_size=4))],
                placed_at_s=draw(st.sampled_from([-1e9, 0.99])),
            )
        )
    # The current state is feasible: host memory holds at least the leased host copies.
    leased_on_host = sum(r.full_bytes for r in rows if r.leased and r.fallback_level == HOST)
    host = max(draw(st.integers(1, 400)) * MB, leased_on_host)
    return rows, PoolShape(hbm_bytes=(hbm,), host_bytes=host, layers=(8,))


@settings(max_examples=150, deadline=None)
@given(pools(), st.integers(0, 9), st.floats(0, 0.2))
def test_capacity_is_never_exceeded(pool, position, budget) -> None:
    rows, shape = pool
    config = PolicyConfig(quality_budget=budget)
    snapshot = build_snapshot(rows, shape, active(shape, position, 1.0))
    plan, _ = step(snapshot, initial_state(snapshot, config), config)
    nbytes = snapshot.blocks.nbytes
    hbm = plan.target_hbm_encoding
    used = sum(int(nbytes[i, e]) for i, e in enumerate(hbm) if e != NONE)
    assert used <= shape.hbm_bytes[0] * (1 - config.hbm_headroom_fraction)
    host = sum(
        int(nbytes[i, 0]) for i, level in enumerate(plan.target_fallback_level) if level == HOST
    )
    assert host <= shape.host_bytes
    for i, row in enumerate(rows):
        if row.leased:
            assert hbm[i] == row.hbm_encoding  # leased copies untouched
        if hbm[i] != NONE:  # floors respected
            assert snapshot.encodings.bits[hbm[i]] >= snapshot.blocks.floor_bits[i]
    assert plan.metrics.quality_cost <= budget + 1e-12 or any(r.leased for r in rows)
