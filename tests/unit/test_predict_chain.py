"""Observe and predict through their compiled chains (``policy._predict_chain``, taken where
``NUMPY_POW8``) against their kernels called one by one with numpy's powers between them (the
path taken elsewhere), bit for bit: the state each leaves and the prediction.

Skipped where numpy does not evaluate ``**`` with SVML (``NUMPY_POW8`` false): both calls would
take the kernels' path.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest

import policy.predict as predict_module
from policy._predict_kernels import NUMPY_POW8
from policy.config import PolicyConfig
from policy.predict import observe, predict
from policy.snapshot import NONE, Snapshot
from policy.state import PolicyState, initial_state
from policy.static import static_for
from policy.synthetic import MoELayout, Router, RoutingKnobs, routed_telemetry, synthetic_pool

pytestmark = pytest.mark.skipif(not NUMPY_POW8, reason="numpy's power is not SVML's here")


def _assert_same_state(chained: PolicyState, by_kernels: PolicyState) -> None:
    for name in (
        "layer_time_s",
        "popularity",
        "observed_concurrency",
        "layer_visits",
        "persistence",
        "last_selected",
        "predicted",
    ):
        a, b = getattr(chained, name), getattr(by_kernels, name)
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), name
    assert chained.steps == by_kernels.steps
    assert chained.quality_total == by_kernels.quality_total
    for a, b in zip(chained.coactivation, by_kernels.coactivation, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.scale == b.scale
            assert np.array_equal(a.pairs, b.pairs) and np.array_equal(a.given, b.given)


def _tick(snapshot: Snapshot, router: Router, tick: int, now_s: float) -> Snapshot:
    """The snapshot of ``tick``: two decode steps every third tick, none every fifth, an idle
    first model every fourth."""
    layer_times = np.full(snapshot.telemetry.layer_time_s.shape, 2e-4)
    layer_times[0, ::3] = np.nan  # not measured
    telemetry = routed_telemetry(snapshot, router, tick, now_s, layer_times)
    if tick % 3 == 2:
        more = routed_telemetry(snapshot, router, tick, now_s, layer_times)
        telemetry = replace(
            telemetry,
            **{
                name: np.concatenate([getattr(telemetry, name), getattr(more, name)])
                for name in ("route_step", "route_model", "route_layer", "route_expert")
            },
        )
    if tick % 5 == 4:
        empty = {name: getattr(telemetry, name)[:0] for name in ("route_step", "route_model")}
        empty |= {name: getattr(telemetry, name)[:0] for name in ("route_layer", "route_expert")}
        telemetry = replace(telemetry, **empty)
    if tick % 4 == 3:
        position, concurrency = telemetry.current_position.copy(), telemetry.concurrency.copy()
        position[0], concurrency[0] = NONE, 0
        telemetry = replace(telemetry, current_position=position, concurrency=concurrency)
    return replace(snapshot, telemetry=telemetry)


@pytest.mark.parametrize("replicas", [1, 3])
@pytest.mark.parametrize(
    "config",
    [
        PolicyConfig(),
        # A sample of the pairs, and the co-activation renormalized within the run.
        PolicyConfig(coactivation_pairs_per_step=7, coactivation_decay=0.999),
        PolicyConfig(coactivation_max_experts=0),  # no co-activation
    ],
)
def test_chains_are_the_kernels_one_by_one(
    monkeypatch: pytest.MonkeyPatch, replicas: int, config: PolicyConfig
) -> None:
    layout = MoELayout(layers=6, experts=13, top_k=3, dense_per_layer=2)
    snapshot = synthetic_pool(layout, replicas, 0.25, total_blocks=replicas * layout.blocks + 7)
    chained = initial_state(snapshot, config)
    by_kernels = copy.deepcopy(chained)
    router = Router(layout, replicas, RoutingKnobs(concurrency=3))
    now_s = 0.0
    renormalized = False
    scale = 1.0
    predicted = 0
    for tick in range(16):
        now_s += config.tick_s
        snapshot = _tick(snapshot, router, tick, now_s)
        quality = observe(snapshot, chained, config)
        monkeypatch.setattr(predict_module, "NUMPY_POW8", False)
        expected_quality = observe(snapshot, by_kernels, config)
        monkeypatch.setattr(predict_module, "NUMPY_POW8", True)
        assert quality == expected_quality
        _assert_same_state(chained, by_kernels)

        static = static_for(snapshot, None, chained.shape)
        prediction = predict(snapshot, chained, static, config)
        monkeypatch.setattr(predict_module, "NUMPY_POW8", False)
        expected = predict(snapshot, by_kernels, static, config)
        monkeypatch.setattr(predict_module, "NUMPY_POW8", True)
        for name in ("time_to_next_use_s", "use_probability", "period_s"):
            a, b = getattr(prediction, name), getattr(expected, name)
            assert np.array_equal(a, b, equal_nan=True), name
        _assert_same_state(chained, by_kernels)
        predicted += int(chained.predicted.sum())
        coact = chained.coactivation[0]
        if coact is not None:
            renormalized |= coact.scale > scale
            scale = coact.scale
    assert predicted > 0 and chained.persistence.all()
    assert renormalized == (config.coactivation_decay == 0.999)
