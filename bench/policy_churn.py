"""How much of the pool the control step changes from one step to the next.

Steps the benchmark's synthetic pool (``bench/policy_scale.py``'s) and, for each step after
``--settle`` steps, compares each per-block field of the plan with the previous step's: the
share of blocks whose value changed, and the share of blocks the plan moves. The median, least
and most over the steps compared, per field, as a markdown table and, as the last line, one
JSON object. It tells how much an incremental step (one that works only on what changed) could
skip.

    python bench/policy_churn.py --blocks 16384 --steps 40
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.policy_scale import stepped_pool
from policy.config import PolicyConfig

FIELDS = (
    "use_probability",
    "time_to_next_use_s",
    "value_density",
    "target_hbm_encoding",
    "target_fallback_level",
    "demand_encoding",
)


def churn(blocks: int, steps: int, settle: int) -> dict[str, list[float]]:
    """Per field (and ``targets``: either target; ``moved``: blocks with a transition), the
    share of blocks changed at each compared step."""
    shares: dict[str, list[float]] = {name: [] for name in (*FIELDS, "targets", "moved")}
    previous: dict[str, np.ndarray] | None = None
    for tick, snapshot, plan in stepped_pool(blocks, steps, PolicyConfig()):
        current = {name: np.array(getattr(plan, name), copy=True) for name in FIELDS}
        if previous is not None and tick >= settle:
            changed = {name: current[name] != previous[name] for name in FIELDS}
            for name in FIELDS:
                shares[name].append(float(changed[name].mean()))
            targets = changed["target_hbm_encoding"] | changed["target_fallback_level"]
            shares["targets"].append(float(targets.mean()))
            moved = len(np.unique(plan.transition_rows.block))
            shares["moved"].append(moved / snapshot.blocks.count)
        previous = current
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=16384, help="pool size (16384)")
    parser.add_argument("--steps", type=int, default=40, help="steps in all (40)")
    parser.add_argument("--settle", type=int, default=5, help="steps before comparing (5)")
    args = parser.parse_args()
    if args.blocks < 1 or args.steps < args.settle + 2 or args.settle < 0:
        parser.error("need --blocks >= 1, --settle >= 0 and --steps >= --settle + 2")
    shares = churn(args.blocks, args.steps, args.settle)
    compared = len(shares["moved"])
    print(f"\n{args.blocks:,} blocks: share changed from step to step ({compared} steps)\n")
    print("| field | median | least | most |")
    print("|---|---:|---:|---:|")
    rows = []
    for name, values in shares.items():
        row = {
            "field": name,
            "median": round(float(np.median(values)), 4),
            "least": round(min(values), 4),
            "most": round(max(values), 4),
        }
        rows.append(row)
        print(f"| {name} | {row['median']} | {row['least']} | {row['most']} |")
    print(json.dumps({"bench": "policy_churn", "blocks": args.blocks, "fields": rows}))


if __name__ == "__main__":
    main()
