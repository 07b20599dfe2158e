"""Where the control step's time goes: every compiled kernel and Python function of the step, timed.

Wraps each numba kernel and each function of the step's modules (``policy.predict``, ``score``,
``veto``, ``schedule``, ``step``, ``static``, ``_arrays``, ``_kernels``) that the step calls by
module attribute with a timer, then steps the benchmark's pools (``bench/policy_scale.py``:
synthetic DeepSeek-V3-like pools, routed telemetry, a fake executor) and reports per step, for
each, the time including what it calls (``incl``) and its own (``excl``: less the wrapped
functions it called from Python). Kernels called from inside other kernels are part of their
caller. The timers add a few microseconds a call, so the step's median here is above
``policy_scale``'s. Prints a markdown table per size and, as its last line, one JSON object.

    python bench/policy_profile.py --sizes 16384,1000000 --steps 10
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import policy.step as step_module  # noqa: E402
from bench.policy_scale import stepped_pool  # noqa: E402
from policy.config import PolicyConfig  # noqa: E402
from policy.plan import Plan  # noqa: E402
from policy.snapshot import Snapshot  # noqa: E402
from policy.state import PolicyState  # noqa: E402

MODULES = (
    "policy.predict",
    "policy.score",
    "policy.veto",
    "policy.schedule",
    "policy.step",
    "policy.static",
    "policy._arrays",
    "policy._kernels",
)


class Timers:
    """Inclusive and exclusive seconds and calls per wrapped function."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self._children: list[float] = []

    def wrap(self, label: str, fn: Callable[..., object]) -> Callable[..., object]:
        @functools.wraps(fn)
        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            self._children.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._children.pop()
                if self._children:
                    self._children[-1] += elapsed
                entry = self.totals.setdefault(label, [0.0, 0.0, 0])
                entry[0] += elapsed
                entry[1] += elapsed - inner
                entry[2] += 1

        return timed


def instrument(timers: Timers) -> None:
    """Replace the kernels and functions the step's modules call with timed wrappers."""
    wrapped: dict[int, Callable[..., object]] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, obj in list(vars(module).items()):
            kernel = isinstance(obj, numba.core.registry.CPUDispatcher)
            function = (
                isinstance(obj, types.FunctionType)
                and obj.__module__.startswith("policy")
                and attr != "step"
            )
            if not (kernel or function):
                continue
            label = f"kernel {attr}" if kernel else f"{obj.__module__.split('.')[-1]}.{attr}"
            if id(obj) not in wrapped:
                wrapped[id(obj)] = timers.wrap(label, obj)
            setattr(module, attr, wrapped[id(obj)])


def profile(blocks: int, steps: int, warmup: int, timers: Timers) -> dict[str, object]:
    step_ms: list[float] = []

    def timed(
        snapshot: Snapshot, state: PolicyState, config: PolicyConfig
    ) -> tuple[Plan, PolicyState]:
        if len(step_ms) == warmup:
            timers.totals.clear()
        start = time.perf_counter()
        result = step_module.step(snapshot, state, config)
        step_ms.append((time.perf_counter() - start) * 1e3)
        return result

    for _ in stepped_pool(blocks, warmup + steps, PolicyConfig(), timed):
        pass
    step_ms = step_ms[warmup:]
    rows = [
        {
            "name": name,
            "incl_ms": round(incl / steps * 1e3, 4),
            "excl_ms": round(excl / steps * 1e3, 4),
            "calls": round(calls / steps, 2),
        }
        for name, (incl, excl, calls) in sorted(timers.totals.items(), key=lambda kv: -kv[1][1])
    ]
    return {"blocks": blocks, "step_ms_median": round(float(np.median(step_ms)), 3), "parts": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="16384,1000000")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=25, help="rows shown per size")
    args = parser.parse_args()
    timers = Timers()
    instrument(timers)
    results = []
    for blocks in (int(s) for s in args.sizes.split(",")):
        result = profile(blocks, args.steps, 3, timers)
        results.append(result)
        print(f"\n{blocks} blocks: step {result['step_ms_median']} ms (median, timers on)\n")
        print("| function | ms a step (incl) | ms a step (excl) | calls a step |")
        print("|---|---:|---:|---:|")
        parts = result["parts"]
        assert isinstance(parts, list)
        for row in parts[: args.top]:
            print(f"| {row['name']} | {row['incl_ms']} | {row['excl_ms']} | {row['calls']} |")
    print(json.dumps({"bench": "policy_profile", "results": results}))


if __name__ == "__main__":
    main()
