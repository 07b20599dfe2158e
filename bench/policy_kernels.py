"""Every compiled kernel of the control step, timed alone on one step's captured inputs.

Steps the benchmark's synthetic pool (``bench/policy_scale.py``'s) for ``--ticks`` steps, captures
the arguments of every kernel the step's modules call at the last one (deep copies), then calls
each kernel on fresh copies of them ``--reps`` times back to back (``warm``: its code and data
in cache) and as often again after writing 64 MB of other memory before each call (``cold``:
as it runs inside the step, where the work between two calls evicts it). Kernels called from
inside other kernels are part of their caller. A kernel that updates its inputs in place gets a
fresh copy each call, so each call does the captured step's work. Prints a markdown table
(slowest cold first) and, as its last line, one JSON object.

    python bench/policy_kernels.py --blocks 16384
    python bench/policy_kernels.py --blocks 1000000 --ticks 8 --reps 6
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import policy.step as step_module  # noqa: E402
from bench.policy_profile import MODULES  # noqa: E402
from bench.policy_scale import stepped_pool  # noqa: E402
from policy.config import PolicyConfig  # noqa: E402
from policy.plan import Plan  # noqa: E402
from policy.snapshot import Snapshot  # noqa: E402
from policy.state import PolicyState  # noqa: E402

Captured = dict[str, tuple[Callable[..., object], tuple[Any, ...], dict[str, Any]]]


def capture_kernels(captured: Captured, armed: list[bool]) -> None:
    """Wrap every kernel the step's modules call so that, while ``armed[0]``, the first call of
    each records a deep copy of its arguments in ``captured``."""
    wrapped: dict[int, Callable[..., object]] = {}

    def wrap(name: str, kernel: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            if armed[0] and name not in captured:
                captured[name] = (kernel, copy.deepcopy(args), copy.deepcopy(kwargs))
            return kernel(*args, **kwargs)

        return call

    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for attr, obj in list(vars(module).items()):
            if isinstance(obj, numba.core.registry.CPUDispatcher):
                if id(obj) not in wrapped:
                    wrapped[id(obj)] = wrap(attr, obj)
                setattr(module, attr, wrapped[id(obj)])


def step_pool(blocks: int, ticks: int, captured: Captured) -> None:
    """``ticks`` steps of the benchmark's pool, the last one's kernel inputs captured."""
    armed = [False]
    capture_kernels(captured, armed)
    calls = 0

    def step_once(
        snapshot: Snapshot, state: PolicyState, config: PolicyConfig
    ) -> tuple[Plan, PolicyState]:
        nonlocal calls
        armed[0] = calls == ticks - 1
        calls += 1
        return step_module.step(snapshot, state, config)

    for _ in stepped_pool(blocks, ticks, PolicyConfig(), step_once):
        pass


def time_kernels(captured: Captured, reps: int) -> list[dict[str, object]]:
    """Per kernel: median ms warm and cold (see the module's docstring)."""
    other = np.ones((64 << 20) // 8)
    rows = []
    for name, (kernel, args, kwargs) in captured.items():
        samples: dict[str, list[float]] = {"warm": [], "cold": []}
        for mode in ("warm", "cold"):
            for _ in range(reps):
                fresh_args, fresh_kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)
                if mode == "cold":
                    other += 1.0
                start = time.perf_counter()
                kernel(*fresh_args, **fresh_kwargs)
                samples[mode].append((time.perf_counter() - start) * 1e3)
        rows.append(
            {
                "kernel": name,
                "warm_ms": round(float(np.median(samples["warm"])), 4),
                "cold_ms": round(float(np.median(samples["cold"])), 4),
                "arguments": len(args) + len(kwargs),
            }
        )
    rows.sort(key=lambda row: -float(row["cold_ms"]))  # type: ignore[arg-type]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=16384, help="pool size (16384)")
    parser.add_argument("--ticks", type=int, default=25, help="steps before the capture (25)")
    parser.add_argument("--reps", type=int, default=30, help="calls per kernel and mode (30)")
    args = parser.parse_args()
    if args.ticks < 1 or args.reps < 1 or args.blocks < 1:
        parser.error("--blocks, --ticks and --reps must be at least 1")
    captured: Captured = {}
    print(f"stepping {args.blocks:,} blocks {args.ticks} times ...", file=sys.stderr)
    step_pool(args.blocks, args.ticks, captured)
    rows = time_kernels(captured, args.reps)
    print(f"\n{args.blocks:,} blocks, each kernel alone (median of {args.reps} calls)\n")
    print("| kernel | cold ms | warm ms | arguments |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['kernel']} | {row['cold_ms']} | {row['warm_ms']} | {row['arguments']} |")
    cold = sum(float(row["cold_ms"]) for row in rows)  # type: ignore[arg-type]
    warm = sum(float(row["warm_ms"]) for row in rows)  # type: ignore[arg-type]
    print(f"| all {len(rows)} | {cold:.3f} | {warm:.3f} | |")
    summary = {"blocks": args.blocks, "cold_ms": round(cold, 3), "warm_ms": round(warm, 3)}
    print(json.dumps({"bench": "policy_kernels", **summary, "kernels": rows}))


if __name__ == "__main__":
    main()
