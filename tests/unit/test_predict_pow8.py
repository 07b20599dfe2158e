"""The predict phase with numpy's vector power called from a kernel (``use_probability``)
against the numpy powers between kernels it replaces, bit for bit.

Skipped where numpy does not evaluate ``**`` with SVML (``NUMPY_POW8`` false): predict then
takes the numpy path these tests compare with.
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
import pytest

import policy.predict as predict_module
from policy._predict_kernels import NUMPY_POW8, _pow8
from policy.config import PolicyConfig
from policy.predict import observe, predict
from policy.state import initial_state
from policy.static import static_for
from policy.synthetic import MoELayout, Router, RoutingKnobs, routed_telemetry, synthetic_pool

pytestmark = pytest.mark.skipif(not NUMPY_POW8, reason="numpy's power is not SVML's here")


@numba.njit(error_model="numpy")
def _powers(base: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    out = np.empty(len(base))
    for at in range(0, len(base), 8):
        _pow8(base, exponent, out, at)
    return out


def test_pow8_is_numpys_power_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 2.0, 0.5, 5e-324, 1e300])
    base = np.concatenate(
        [
            rng.random(4000),
            rng.random(4000) * 1e-6,
            np.repeat(special, len(special)),
            -rng.random(96),
        ]
    )
    exponent = np.concatenate(
        [
            rng.choice([1.0, 2.0, 4.0, 0.5, 0.25, 1 / 3.7, 32.0], 8000),
            np.tile(special, len(special)),
            rng.choice([2.0, 3.0, 0.5], 96),
        ]
    )
    base, exponent = base[: len(base) // 8 * 8], exponent[: len(base) // 8 * 8]
    with np.errstate(all="ignore"):
        expected = base**exponent
    assert np.array_equal(_powers(base, exponent).view(np.int64), expected.view(np.int64))


@pytest.mark.parametrize("concurrency", [1, 2, 4])
def test_predict_is_the_numpy_powers_path(
    monkeypatch: pytest.MonkeyPatch, concurrency: int
) -> None:
    layout = MoELayout(layers=6, experts=13, top_k=3, dense_per_layer=2)
    snapshot = synthetic_pool(layout, 3, 0.25, total_blocks=3 * layout.blocks + 7)
    config = PolicyConfig()
    state = initial_state(snapshot, config)
    router = Router(layout, 3, RoutingKnobs(concurrency=concurrency))
    layer_times = np.full(snapshot.telemetry.layer_time_s.shape, 2e-4)
    now_s = 0.0
    predicted = 0
    for tick in range(12):
        now_s += config.tick_s
        telemetry = routed_telemetry(snapshot, router, tick, now_s, layer_times)
        snapshot = replace(snapshot, telemetry=telemetry)
        observe(snapshot, state, config)
        static = static_for(snapshot, None, state.shape)
        fused = predict(snapshot, state, static, config)
        fused_set = state.predicted.copy()
        monkeypatch.setattr(predict_module, "NUMPY_POW8", False)
        numpy_path = predict(snapshot, state, static, config)
        monkeypatch.setattr(predict_module, "NUMPY_POW8", True)
        assert np.array_equal(fused.use_probability, numpy_path.use_probability, equal_nan=True)
        assert np.array_equal(fused.time_to_next_use_s, numpy_path.time_to_next_use_s)
        assert np.array_equal(fused_set, state.predicted)
        predicted += int(fused_set.sum())
    assert predicted > 0
