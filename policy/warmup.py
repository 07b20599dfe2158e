"""Compile the control step's numba kernels into their on-disk cache: ``python -m policy.warmup``.

Every kernel is compiled on its first call (``cache=True``) and the machine code is kept beside
the sources (``policy/__pycache__``), so only the first process on a fresh checkout pays for it:
about 25 to 40 s on a 2-core machine. Without a warm-up that process is the placement
controller, whose first step then holds its lock that long and every lease waits. ``make``
runs this once after installing. It steps a small synthetic MoE pool with routing telemetry
through the same code paths (and argument types) the controller uses.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import numpy as np

from policy.builder import BlockRow, PoolShape, build_snapshot, execute_instantly, idle_telemetry
from policy.config import PolicyConfig
from policy.predict import predict
from policy.score import score_and_choose
from policy.state import initial_state
from policy.static import static_for
from policy.step import step
from policy.synthetic import MoELayout, Router, RoutingKnobs, routed_telemetry, synthetic_pool
from policy.veto import veto_and_refine
from pool.encoding import Precision

_MB = 1 << 20


def warm_up(steps: int = 6) -> float:
    """Run ``steps`` control steps on a small pool (compiling what is not cached); seconds."""
    started = time.perf_counter()
    layout = MoELayout(layers=4, experts=8, top_k=2, dense_per_layer=3)
    snapshot = synthetic_pool(layout, 2, 0.25, total_blocks=2 * layout.blocks)
    config = PolicyConfig.model_validate({})
    state = initial_state(snapshot, config)
    router = Router(layout, 2, RoutingKnobs(concurrency=2))
    layer_times = np.full(snapshot.telemetry.layer_time_s.shape, 2e-4)
    now_s = 0.0
    for tick in range(steps):
        now_s += config.tick_s
        telemetry = routed_telemetry(snapshot, router, tick, now_s, layer_times)
        snapshot = replace(snapshot, telemetry=telemetry)
        plan, state = step(snapshot, state, config)
        snapshot = execute_instantly(snapshot, plan, now_s)
    plan.demand_encoding_of(0)  # computed when asked (policy.demand): a lease miss's first
    _warm_up_rare_vetoes()
    return time.perf_counter() - started


def _warm_up_rare_vetoes() -> None:
    """The veto's rare cases, which its compiled call hands back to Python
    (``policy._veto_resume``): a proposal below a block's floor (rule 2) and a tier proposed
    over its budget (the capacity guard), each on a two-block pool."""
    shape = PoolShape(hbm_bytes=(12 * _MB,), layers=(4,))
    rows = [
        BlockRow("m/a", 10 * _MB, layer=1, floor=Precision.INT8),
        BlockRow("m/b", 10 * _MB, layer=3),
    ]
    snapshot = build_snapshot(rows, shape, idle_telemetry(shape, 1.0))
    config = PolicyConfig.model_validate({"hbm_headroom_fraction": 0, "quality_budget": 1.0})
    for proposal in ([4, 4], [0, 0]):  # INT4 below "m/a"'s floor; both at full precision
        state = initial_state(snapshot, config)
        static = static_for(snapshot, None, state.shape)
        prediction = predict(snapshot, state, static, config)
        scores, targets = score_and_choose(snapshot, prediction, static, config)
        targets.hbm_encoding[:] = proposal
        veto_and_refine(snapshot, scores, targets, prediction, config)


if __name__ == "__main__":
    print(f"policy kernels ready in {warm_up():.1f} s", file=sys.stderr)
