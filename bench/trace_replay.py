"""Trace replay: weightpool's policy against the policies people use today, and an oracle.

    python bench/trace_replay.py --model mixtral-8x7b --hw h100-pcie5 --hbm-fraction 0.25 \\
        [--trace FILE | --synthetic NAME | --record] [--steps 300] --json
    python bench/trace_replay.py --model mixtral-8x7b --sweep 0.1,0.25,0.5 --png stall.png

The first prints a markdown table and, as its last line, one JSON object; the second replays at
each HBM fraction and plots stall per token by policy (its JSON describes the last fraction under
"policies" and every fraction under "sweep"). Every policy replays the same trace on the
same hardware model (see bench/replay/). ``weightpool-placement`` is weightpool with every
reduced precision disabled (placement only), the fair comparison with the oracle.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.replay.presets import (
    HARDWARE,
    MODELS,
    layout,
)
from bench.replay.quality import load_calibration, synthetic_sensitivity
from bench.replay.runner import ALL_POLICIES, ReplaySetup, run_replay
from bench.replay.trace import SYNTHETIC_PRESETS, TraceError, read, synthesize

COLUMNS = (
    ("stall_ms_per_token", "stall ms/token", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:.2f}"),
    ("hbm_hit_rate", "HBM hit rate", "{:.3f}"),
    ("bytes_moved_per_token", "GB moved/token", "{:.3f}"),
    ("quality_cost", "quality cost/token", "{:.4f}"),
    ("prediction_recall", "prediction recall", "{:.3f}"),
    ("prefetch_precision", "prefetch precision", "{:.3f}"),
)
NOTE = (
    "prediction recall: the share of routed-expert reads whose expert the policy had fetched "
    "ahead of need since its previous read; prefetch precision: the share of those fetches read "
    "before leaving HBM; '-': the policy never fetches ahead (no prediction to measure)."
)


def _trace(args: argparse.Namespace, model) -> tuple:  # type: ignore[no-untyped-def]
    if args.trace:
        trace = read(args.trace)
        return trace, str(args.trace)
    if args.record:
        from bench.replay.record import record_routing

        trace = record_routing(
            model.moe_layers, model.experts, model.top_k, args.steps, args.seed, args.corpus
        )
        return trace, trace.source
    knobs = SYNTHETIC_PRESETS[args.synthetic]
    trace = synthesize(
        model.moe_layers, model.experts, model.top_k, args.steps, knobs, args.seed, args.synthetic
    )
    return trace, f"synthetic:{args.synthetic}"


def _table(results: dict) -> str:  # type: ignore[type-arg]
    lines = ["| policy | " + " | ".join(label for _, label, _ in COLUMNS) + " |"]
    lines.append("|---|" + "---:|" * len(COLUMNS))
    for name, figures in results.items():
        cells = []
        for key, _, fmt in COLUMNS:
            value = figures.get(key)
            if key == "bytes_moved_per_token" and value is not None:
                value = value / 1e9
            cells.append("-" if value is None else fmt.format(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="mixtral-8x7b")
    parser.add_argument("--hw", choices=sorted(HARDWARE), default="h100-pcie5")
    parser.add_argument("--hbm-fraction", type=float, default=0.25)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--trace", type=Path, help="an Arrow IPC or Parquet trace (DESIGN section 7)"
    )
    source.add_argument("--synthetic", choices=sorted(SYNTHETIC_PRESETS), default="default")
    source.add_argument(
        "--record",
        action="store_true",
        help="record routing from a transformers OLMoE-architecture model of the preset's "
        "routing shape (random weights) reading --corpus (see bench/replay/record.py)",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=Path("/usr/share/common-licenses"),
        help="text file or folder whose words --record feeds the model",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="tokens of a synthetic or recorded trace (300)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality-budget", type=float, default=0.02, help="drift per token")
    parser.add_argument("--calibration", type=Path, help="JSON of measured sensitivities")
    parser.add_argument("--policies", default=",".join(ALL_POLICIES))
    parser.add_argument("--sweep", help="comma-separated HBM fractions; with --png, plot them")
    parser.add_argument("--png", type=Path, help="where the sweep's plot goes")
    parser.add_argument(
        "--plan-misses",
        action="store_true",
        help="weightpool runs its step on each position's misses, as the controller does on a "
        "lease miss (a step per missing position: slower; see bench/replay/weightpool_policy.py)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="100 tokens unless --steps says otherwise (what `weightpool bench` runs)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON summary last")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 100 if args.quick else 300
    if args.steps < 1:
        parser.error(f"--steps {args.steps} must be at least 1")
    if not 0 < args.hbm_fraction <= 1:
        parser.error(f"--hbm-fraction {args.hbm_fraction} must be in (0, 1]")
    model = MODELS[args.model]
    try:
        trace, trace_name = _trace(args, model)
        trace.check_fits(model.moe_layers, model.experts)
    except TraceError as err:
        parser.error(str(err))
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    unknown = [p for p in policies if p not in ALL_POLICIES]
    if unknown:
        parser.error(f"unknown policies {unknown}; expected some of {list(ALL_POLICIES)}")
    sensitivity = synthetic_sensitivity(layout(model), args.seed)
    if args.calibration:
        sensitivity = load_calibration(args.calibration, layout(model), sensitivity)
    fractions = [float(f) for f in args.sweep.split(",")] if args.sweep else [args.hbm_fraction]
    sweep = {}
    for fraction in fractions:
        setup = ReplaySetup(
            model, HARDWARE[args.hw], fraction, args.quality_budget, plan_misses=args.plan_misses
        )
        results = run_replay(setup, trace, policies, sensitivity)
        sweep[fraction] = results
        print(
            f"\n{model.name} on {args.hw}, HBM {fraction:.0%} of the model, {trace_name}, "
            f"{trace.steps} tokens\n"
        )
        print(_table(results))
        print(f"\n{NOTE}")
    if args.png:
        _plot(sweep, args.png, f"{model.name} on {args.hw}, {trace_name}")
        print(f"\nplot written to {args.png}")
    if args.json:
        last = fractions[-1]

        def figures(results: dict) -> dict:  # type: ignore[type-arg]
            return {
                name: {k: v for k, v in values.items() if k != "replay_s"}
                for name, values in results.items()
            }

        extra = {"sweep": {str(f): figures(sweep[f]) for f in fractions}} if args.sweep else {}
        print(
            json.dumps(
                {
                    "bench": "trace_replay",
                    "model": model.name,
                    "hw": args.hw,
                    "hbm_fraction": last,
                    "trace": trace_name,
                    "quality_budget": args.quality_budget,
                    "plan_misses": args.plan_misses,
                    "policies": figures(sweep[last]),
                    **extra,
                }
            )
        )


def _plot(sweep: dict, path: Path, title: str) -> None:  # type: ignore[type-arg]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("the sweep's plot needs matplotlib: pip install matplotlib") from None
    fractions = sorted(sweep)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name in next(iter(sweep.values())):
        axis.plot(
            fractions,
            [sweep[f][name]["stall_ms_per_token"] for f in fractions],
            marker="o",
            label=name,
        )
    axis.set_xlabel("HBM, fraction of the model at full precision")
    axis.set_ylabel("stall per token (ms)")
    axis.set_yscale("symlog", linthresh=1.0)
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
