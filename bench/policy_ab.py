r"""The control step of two commits side by side, in one process, steps alternating.

Separate runs of ``bench/policy_scale.py`` on this shared 2-core machine differ by 10 % and
more; a change of a few per cent shows only when the two codes run under the same conditions.
This copies the ``policy`` package of ``--base`` (a git revision) into a temporary directory as
``policy_base`` (its imports rewritten), builds the same synthetic pool for it and for this
tree's ``policy`` (``policy.synthetic``, as ``policy_scale`` does), and steps both in turn, the
order swapped every step, each on its own state and snapshot. Prints per size the medians of
each side's step time and phases, the median of the per-step ratios (new / base) and, as its
last line, one JSON object. The base's kernels are compiled on its first step (about a minute;
not timed), cached beside the copy; this tree's come from its own cache.

    python bench/policy_ab.py --base 5bb0505 --sizes 1000,16384 --steps 200
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 3


def export_base(revision: str, into: Path) -> None:
    """``policy/`` at ``revision`` as the package ``policy_base`` under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "policy"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "policy").rename(into / "policy_base")
    pattern = re.compile(r"\b(from|import) policy(\.|\b)")
    for path in (into / "policy_base").rglob("*.py"):
        path.write_text(pattern.sub(r"\1 policy_base\2", path.read_text()))


def stepper(package: str, blocks: int) -> Iterator[tuple[float, dict[str, float]]]:
    """Steps of ``package``'s control step on ``policy_scale``'s pool of ``blocks`` blocks:
    yields each step's milliseconds and its phases' (from the plan's metrics)."""
    synthetic = importlib.import_module(package + ".synthetic")
    builder = importlib.import_module(package + ".builder")
    config = importlib.import_module(package + ".config").PolicyConfig()
    initial_state = importlib.import_module(package + ".state").initial_state
    step = importlib.import_module(package + ".step").step
    deep = synthetic.MoELayout()
    small = synthetic.MoELayout(layers=24, experts=32, top_k=4, dense_per_layer=9)
    layout = small if blocks < deep.blocks else deep
    replicas = max(1, blocks // layout.blocks)
    snapshot = synthetic.synthetic_pool(layout, replicas, 0.25, total_blocks=blocks)
    state = initial_state(snapshot, config)
    router = synthetic.Router(layout, replicas, synthetic.RoutingKnobs(concurrency=4))
    rng = np.random.default_rng(1)
    now, tick = 0.0, 0
    while True:
        now += config.tick_s
        layer_times = synthetic.drawn_layer_times(snapshot, rng)
        telemetry = synthetic.routed_telemetry(snapshot, router, tick, now, layer_times)
        snapshot = replace(snapshot, telemetry=telemetry)
        start = time.perf_counter()
        plan, state = step(snapshot, state, config)
        yield (time.perf_counter() - start) * 1e3, dict(plan.metrics.phase_ms)
        snapshot = builder.execute_instantly(snapshot, plan, now)
        tick += 1


def compare(blocks: int, steps: int) -> dict[str, Any]:
    base, new = stepper("policy_base", blocks), stepper("policy", blocks)
    times: dict[str, list[float]] = {"base": [], "new": []}
    phases: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
    for i in range(WARMUP_STEPS + steps):
        order = (("base", base), ("new", new)) if i % 2 == 0 else (("new", new), ("base", base))
        for side, steps_of in order:
            ms, phase_ms = next(steps_of)
            if i >= WARMUP_STEPS:
                times[side].append(ms)
                phases[side].append(phase_ms)
    ratio = np.array(times["new"]) / np.array(times["base"])
    return {
        "blocks": blocks,
        "steps": steps,
        **{f"{side}_step_ms_median": round(float(np.median(times[side])), 3) for side in times},
        "ratio_median": round(float(np.median(ratio)), 4),
        **{
            f"{side}_phase_ms_median": {
                k: round(float(np.median([p[k] for p in phases[side]])), 3) for k in phases[side][0]
            }
            for side in phases
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--sizes", default="1000,16384", help="pool sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per side and size")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="weightpool-policy-ab-") as tmp:
        export_base(args.base, Path(tmp))
        sys.path.insert(0, tmp)
        results = [compare(blocks, args.steps) for blocks in sizes]
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(f"| blocks | {args.base} ms | this tree ({head}) ms | median of new / base |")
    print("|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['blocks']:,} | {r['base_step_ms_median']} | {r['new_step_ms_median']} | "
            f"{r['ratio_median']} |"
        )
    print(
        json.dumps(
            {
                "bench": "policy_ab",
                "base": args.base,
                "head": head,
                "load": os.getloadavg()[0],
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
