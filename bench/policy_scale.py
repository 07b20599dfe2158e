"""The control step's cost as the pool grows: 1,000 to 1,000,000 blocks.

Pools are synthetic DeepSeek-V3-like MoE models (58 MoE layers of 256 experts, top-8, four dense
blocks per layer; one model is 15,082 blocks), replicated and padded with dense shard blocks to
the exact count; a 1,000-block pool is one smaller model (24 layers of 32 experts). HBM holds a
quarter of the pool at full precision, host memory half. Telemetry is realistic: every step
brings one decode step of router choices for every model (4 concurrent sequences, Zipf
popularity, persistence and cross-layer correlation), measured layer times, and the current
position; the plan of each step is executed at once (a fake executor) before the next.

Each pool is warmed up, then ``--steps`` steps are timed one by one (``time.perf_counter``
around ``step`` alone). The first step of the run is reported apart: it compiles the policy's
kernels when they are not cached yet. Numpy runs on one thread (the script sets the BLAS thread
variables before importing numpy). Prints a markdown table and, as its last line, one JSON object.

    python bench/policy_scale.py --quick --json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy.builder import execute_instantly  # noqa: E402
from policy.config import PolicyConfig  # noqa: E402
from policy.plan import Plan  # noqa: E402
from policy.snapshot import Snapshot  # noqa: E402
from policy.state import PolicyState, initial_state  # noqa: E402
from policy.step import step  # noqa: E402
from policy.synthetic import (  # noqa: E402
    MoELayout,
    Router,
    RoutingKnobs,
    drawn_layer_times,
    routed_telemetry,
    synthetic_pool,
)

DEEPSEEK = MoELayout()
SMALL = MoELayout(layers=24, experts=32, top_k=4, dense_per_layer=9)


def pool_for(blocks: int) -> tuple[MoELayout, int]:
    layout = SMALL if blocks < DEEPSEEK.blocks else DEEPSEEK
    return layout, max(1, blocks // layout.blocks)


StepFn = Callable[[Snapshot, PolicyState, PolicyConfig], tuple[Plan, PolicyState]]


def stepped_pool(
    blocks: int, steps: int, config: PolicyConfig, step_fn: StepFn = step
) -> Iterator[tuple[int, Snapshot, Plan]]:
    """This benchmark's pool of ``blocks`` stepped ``steps`` times by ``step_fn``, untimed: per
    step, the tick, the snapshot the step saw and its plan (executed at once after the yield).
    For the other policy benchmarks; ``run`` times its own loop."""
    layout, replicas = pool_for(blocks)
    snapshot = synthetic_pool(layout, replicas, 0.25, total_blocks=blocks)
    state = initial_state(snapshot, config)
    router = Router(layout, replicas, RoutingKnobs(concurrency=4))
    rng = np.random.default_rng(1)
    now = 0.0
    for tick in range(steps):
        now += config.tick_s
        telemetry = routed_telemetry(snapshot, router, tick, now, drawn_layer_times(snapshot, rng))
        snapshot = replace(snapshot, telemetry=telemetry)
        plan, state = step_fn(snapshot, state, config)
        yield tick, snapshot, plan
        snapshot = execute_instantly(snapshot, plan, now)


def run(blocks: int, steps: int, warmup: int, config: PolicyConfig) -> dict[str, float]:
    layout, replicas = pool_for(blocks)
    snapshot = synthetic_pool(layout, replicas, 0.25, total_blocks=blocks)
    state: PolicyState = initial_state(snapshot, config)
    router = Router(layout, replicas, RoutingKnobs(concurrency=4))
    rng = np.random.default_rng(1)
    times, phases = [], []
    first_step_s = 0.0
    now = 0.0
    for tick in range(warmup + steps):
        now += config.tick_s
        layer_times = drawn_layer_times(snapshot, rng)
        telemetry = routed_telemetry(snapshot, router, tick, now, layer_times)
        snapshot = replace(snapshot, telemetry=telemetry)
        start = time.perf_counter()
        plan, state = step(snapshot, state, config)
        elapsed = time.perf_counter() - start
        if tick == 0:
            first_step_s = elapsed
        if tick >= warmup:
            times.append(elapsed * 1e3)
            phases.append(plan.metrics.phase_ms)
        snapshot = execute_instantly(snapshot, plan, now)
    phase_median = {k: float(np.median([p[k] for p in phases])) for k in phases[0]}
    return {
        "blocks": blocks,
        "models": replicas,
        "step_ms_median": round(float(np.median(times)), 3),
        "step_ms_p99": round(float(np.percentile(times, 99)), 3),
        "steps": steps,
        "first_step_s": round(first_step_s, 3),
        **{f"{k}_ms_median": round(v, 3) for k, v in phase_median.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (under 60 s)")
    parser.add_argument("--json", action="store_true", help="print the JSON summary last")
    parser.add_argument("--sizes", default="1000,16384,100000,1000000")
    args = parser.parse_args()
    config = PolicyConfig()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for blocks in sizes:
        steps = (
            (20 if blocks <= 100_000 else 5) if args.quick else (200 if blocks <= 100_000 else 30)
        )
        warmup = 3 if args.quick else 10
        results.append(run(blocks, steps, warmup, config))
        print(f"  {blocks} blocks: {results[-1]['step_ms_median']} ms median", file=sys.stderr)
    print(
        "| blocks | models | step ms (median) | p99 | observe | predict | score | veto | schedule |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['blocks']} | {r['models']} | {r['step_ms_median']} | {r['step_ms_p99']} | "
            f"{r['observe_ms_median']} | {r['predict_ms_median']} | {r['score_ms_median']} | "
            f"{r['veto_ms_median']} | {r['schedule_ms_median']} |"
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        growth = last["step_ms_median"] / first["step_ms_median"]
        ratio = last["blocks"] / first["blocks"]
        print(
            f"\ngrowth {first['blocks']} -> {last['blocks']} blocks: "
            f"x{growth:.1f} time for x{ratio:.0f} blocks"
        )
    # The kernels compile on the first step of the first pool unless policy/__pycache__ holds
    # them (``python -m policy.warmup``); the warm-up steps keep that out of the figures above.
    print(f"first step (compiles the kernels if not cached): {results[0]['first_step_s']} s")
    if args.json:
        print(json.dumps({"bench": "policy_scale", "results": results}))


if __name__ == "__main__":
    main()
