r"""Are the control step's plans bit-identical to a recorded run? ``--save F`` / ``--check F``.

Builds 16 deterministic scenarios (pools of 1,000, 16,384, 100,000 and 1,000,000 blocks from
``policy.synthetic``, each in four variants), runs ``--steps`` steps of each with routed telemetry
and a fake executor, and hashes every field of every plan (records, targets, signals, metrics but
the phase timings) and the policy state after the last step (the cached ``Static`` aside: it is
derived from the snapshot). The variants together cover what the step branches on:

- ``plain``: the benchmark's pool (one device, host memory, default config);
- ``devices``: two devices (layers alternate between them), CXL memory, leases on resident
  blocks, waiting demand, copies in flight;
- ``guards``: precision floors, unknown sensitivities, regenerable blocks, busy links and a tight
  quality budget (the veto's budget rounds);
- ``all``: everything above, a quality weight in scoring, a cap on transitions per step, and
  other tenants' reserved HBM under the pool's pinned copies (the capacity guard).

Pools but ``plain`` start in use (``_warm_start``).

The plan's ``demand_encoding`` (added after the record of 0cb1a73) is hashed apart, so that the
record of the other fields stays comparable: ``--demand-save FILE`` records its hashes,
``--demand-check FILE`` compares them (either goes with ``--save`` or ``--check``).

``--check`` exits 1 and names the first differing scenario, step and fields; it also prints, per
scenario, the transitions, transfers and rejections it saw (coverage), and the step's seconds.
The last stdout line is one JSON object.

    python bench/policy_identity.py --save bench/results/policy_identity.json
    python bench/policy_identity.py --check bench/results/policy_identity.json \
        --demand-check bench/results/policy_identity_demand.json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, fields, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy.builder import PoolShape, execute_instantly, tiers_for  # noqa: E402
from policy.config import PolicyConfig  # noqa: E402
from policy.plan import Plan  # noqa: E402
from policy.snapshot import CXL, HBM, HOST, NONE, STORAGE, Snapshot  # noqa: E402
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
from pool.encoding import PRECISION_BITS, Precision  # noqa: E402

SIZES = (1000, 16_384, 100_000, 1_000_000)
VARIANTS = ("plain", "devices", "guards", "all")
DEEPSEEK = MoELayout()
SMALL = MoELayout(layers=24, experts=32, top_k=4, dense_per_layer=9)


@dataclass(frozen=True)
class Variant:
    two_devices: bool = False
    cxl: bool = False
    leases: bool = False
    demand: bool = False
    in_flight: bool = False
    floors: bool = False
    unknown: bool = False
    regenerable: bool = False
    busy: bool = False
    config: tuple[tuple[str, float], ...] = ()


VARIANT_FLAGS = {
    "plain": Variant(),
    "devices": Variant(
        two_devices=True,
        cxl=True,
        leases=True,
        demand=True,
        in_flight=True,
        config=(("tick_s", 0.05),),
    ),
    "guards": Variant(
        floors=True,
        unknown=True,
        regenerable=True,
        busy=True,
        config=(("quality_budget", 2e-4),),
    ),
    "all": Variant(
        two_devices=True,
        cxl=True,
        leases=True,
        demand=True,
        in_flight=True,
        floors=True,
        unknown=True,
        regenerable=True,
        busy=True,
        config=(
            ("quality_budget", 1e-4),
            ("quality_weight_s", 0.05),
            ("max_transitions_per_step", 2000),
        ),
    ),
}


def _tiers(snapshot: Snapshot, two_devices: bool, cxl: bool) -> Snapshot:
    """The pool's tiers rebuilt: one or two devices sharing its HBM, host memory, CXL memory
    (a third of the pool) if asked, storage. With two devices, even layers compute on the
    second."""
    b, tiers = snapshot.blocks, snapshot.tiers
    full = int(b.nbytes[:, 0].sum())
    hbm = int(tiers.capacity_bytes[0])
    devices = 2 if two_devices else 1
    shape = PoolShape(hbm_bytes=[hbm // devices] * devices, host_bytes=full // 2)
    arrays, host, cxl_tier = tiers_for(replace(shape, cxl_bytes=full // 3 if cxl else 0))
    n = b.count
    blocks = replace(
        b,
        hbm_tier=(b.position % devices).astype(np.int64) if two_devices else np.zeros(n, np.int64),
        host_tier=np.full(n, host, np.int64),
        cxl_tier=np.full(n, cxl_tier, np.int64),
    )
    return replace(snapshot, tiers=arrays, blocks=blocks)


def _guards(snapshot: Snapshot, variant: Variant, rng: np.random.Generator) -> Snapshot:
    """Floors, unknown sensitivities and regenerators on fixed random blocks (made once)."""
    b = snapshot.blocks
    n = b.count
    floor_bits, sensitivity, regenerable = b.floor_bits, b.sensitivity, b.regenerable
    if variant.floors:
        floor_bits = floor_bits.copy()
        choice = rng.random(n)
        floor_bits[choice < 0.2] = PRECISION_BITS[Precision.INT8]
        floor_bits[choice < 0.05] = PRECISION_BITS[Precision.FULL]
    if variant.unknown:
        sensitivity = sensitivity.copy()
        unknown = rng.random(sensitivity.shape) < 0.03
        unknown[:, 0] = False  # full precision is always known (0)
        sensitivity[unknown] = np.inf
    if variant.regenerable:
        regenerable = rng.random(n) < 0.02
    return replace(
        snapshot,
        blocks=replace(b, floor_bits=floor_bits, sensitivity=sensitivity, regenerable=regenerable),
    )


def _warm_start(
    snapshot: Snapshot, fill: float, recent: float, rng: np.random.Generator
) -> Snapshot:
    """A pool already in use: random blocks resident in their device's HBM at a random encoding
    (one in five below its floor, as after a new calibration) up to ``fill`` of it, fallback
    copies in host and CXL memory (up to ``fill``), a share ``recent`` of the blocks placed
    recently (within the minimum dwell)."""
    b, tiers = snapshot.blocks, snapshot.tiers
    n = b.count
    hbm = np.full(n, NONE, np.int64)
    fallback = np.full(n, STORAGE, np.int64)
    bits = snapshot.encodings.bits
    order = rng.permutation(n)
    encoding = rng.integers(0, b.nbytes.shape[1], n)
    keep_floor = rng.random(n) < 0.8
    encoding = np.where((bits[encoding] >= b.floor_bits) | ~keep_floor, encoding, 0)
    size = b.nbytes[np.arange(n), encoding]
    room = (tiers.usable_bytes * fill).astype(np.int64)
    for tier in np.flatnonzero(tiers.level == HBM).tolist():
        rows = order[b.hbm_tier[order] == tier]
        fits = rows[np.cumsum(size[rows]) <= room[tier]]
        hbm[fits] = encoding[fits]
    for level, tier_of in ((HOST, b.host_tier), (CXL, b.cxl_tier)):
        rows = rng.permutation(n)
        rows = rows[(tier_of[rows] != NONE) & (fallback[rows] == STORAGE)]
        if len(rows) == 0:
            continue
        fits = rows[np.cumsum(b.nbytes[rows, 0]) <= room[tier_of[rows[0]]]]
        fallback[fits] = level
    placed = np.where(rng.random(n) < recent, 0.0, -1e9)
    blocks = replace(b, hbm_encoding=hbm, fallback_level=fallback, placed_at_s=placed)
    return replace(snapshot, blocks=blocks)


def _perturb(snapshot: Snapshot, variant: Variant, rng: np.random.Generator) -> Snapshot:
    """Per step: leases on some resident blocks, demand on some cold ones, copies in flight."""
    b = snapshot.blocks
    n = b.count
    resident = b.hbm_encoding != NONE
    changes = {}
    if variant.leases:
        changes["leased"] = resident & (rng.random(n) < 0.1)
    if variant.demand:
        changes["demand"] = ~resident & (rng.random(n) < 0.002)
    if variant.in_flight:
        in_flight = b.in_flight_encoding.copy()
        start = ~resident & (in_flight == NONE) & (rng.random(n) < 0.001)
        in_flight[start] = rng.choice(np.array([0, 3]), int(start.sum()))
        changes["in_flight_encoding"] = in_flight
    return replace(snapshot, blocks=replace(b, **changes)) if changes else snapshot


def _digest(value: object) -> str:
    h = hashlib.sha256()
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()[:16]


SEPARATE = ("demand_encoding",)  # plan fields hashed apart (``demand_hashes``)
SKIPPED = ("demand",)  # what ``demand_encoding`` is computed from (``policy.demand``)


def plan_hashes(plan: Plan) -> dict[str, str]:
    """One hash per plan field (record arrays field by field; metrics without phase timings),
    those in ``SEPARATE`` aside."""
    out: dict[str, str] = {}
    for f in fields(plan):
        value = getattr(plan, f.name)
        if f.name in SEPARATE or f.name in SKIPPED:
            continue
        if f.name in ("transition_rows", "transfer_rows"):
            for g in fields(value):
                out[f"{f.name}.{g.name}"] = _digest(getattr(value, g.name))
        elif f.name == "metrics":
            for g in fields(value):
                if g.name != "phase_ms":
                    out[f"metrics.{g.name}"] = _digest(getattr(value, g.name))
        elif f.name == "block_ids":
            out[f.name] = _digest(len(value))
        else:
            out[f.name] = _digest(value)
    return out


def demand_hashes(plan: Plan) -> dict[str, str]:
    """One hash per plan field of ``SEPARATE``."""
    return {name: _digest(getattr(plan, name)) for name in SEPARATE}


def state_hashes(state: PolicyState) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if f.name == "static" or (f.name == "quality_feedback" and value is None):
            continue  # the cache; the feedback's record, absent while it is off (the default)
        if f.name == "coactivation":
            for i, c in enumerate(value):
                if c is not None:
                    out[f"coactivation.{i}"] = _digest(
                        _digest(c.pairs) + _digest(c.given) + repr(c.scale)
                    )
        else:
            out[f.name] = _digest(value)
    return out


def run_scenario(blocks: int, name: str, steps: int) -> dict[str, object]:
    variant = VARIANT_FLAGS[name]
    config = PolicyConfig(**dict(variant.config))  # type: ignore[arg-type]
    layout = SMALL if blocks < DEEPSEEK.blocks else DEEPSEEK
    replicas = max(1, blocks // layout.blocks)
    snapshot = synthetic_pool(layout, replicas, 0.25, total_blocks=blocks)
    snapshot = _tiers(snapshot, variant.two_devices, variant.cxl)
    rng = np.random.default_rng(blocks * 7 + VARIANTS.index(name))
    snapshot = _guards(snapshot, variant, rng)
    if name != "plain":
        snapshot = _warm_start(
            snapshot, 0.9 if name == "devices" else 1.0, 0.3 if name == "all" else 0.1, rng
        )
    if name == "all":  # other tenants took 70% of each HBM: pinned copies overfill it
        tiers = snapshot.tiers
        reserved = np.where(tiers.level == HBM, tiers.capacity_bytes * 7 // 10, 0)
        snapshot = replace(snapshot, tiers=replace(tiers, reserved_bytes=reserved))
    state = initial_state(snapshot, config)
    router = Router(layout, replicas, RoutingKnobs(concurrency=4))
    now = 0.0
    step_hashes, demand, seconds = [], [], []
    counts = {"transitions": 0, "transfers": 0, "rejections": 0, "cancels": 0}
    rules: dict[int, int] = {}
    for tick in range(steps):
        now += config.tick_s
        layer_times = drawn_layer_times(snapshot, rng)
        telemetry = routed_telemetry(snapshot, router, tick, now, layer_times)
        if variant.busy:
            telemetry = replace(telemetry, link_busy_fraction=rng.uniform(0, 0.9, (4, 4)))
        snapshot = replace(snapshot, telemetry=telemetry)
        if tick >= 2:
            snapshot = _perturb(snapshot, variant, rng)
        start = time.perf_counter()
        plan, state = step(snapshot, state, config)
        seconds.append(time.perf_counter() - start)
        step_hashes.append(plan_hashes(plan))
        demand.append(demand_hashes(plan))
        counts["transitions"] += len(plan.transition_rows.block)
        counts["transfers"] += len(plan.transfer_rows.block)
        counts["rejections"] += len(plan.rejection_block)
        counts["cancels"] += len(plan.cancel_block)
        for rule in plan.rejection_rule.tolist():
            rules[rule] = rules.get(rule, 0) + 1
        snapshot = execute_instantly(snapshot, plan, now)
    return {
        "steps": step_hashes,
        "state": state_hashes(state),
        "demand": demand,
        "coverage": {**counts, "rejections_by_rule": dict(sorted(rules.items()))},
        "step_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", type=Path, help="record the hashes of this checkout")
    action.add_argument("--check", type=Path, help="compare this checkout with a record")
    parser.add_argument("--demand-save", type=Path, help="record the demand_encoding hashes")
    parser.add_argument("--demand-check", type=Path, help="compare demand_encoding hashes")
    parser.add_argument("--steps", type=int, default=6, help="steps per scenario (6)")
    parser.add_argument(
        "--sizes",
        default=",".join(str(s) for s in SIZES),
        help="comma-separated pool sizes in blocks",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    record = json.loads(args.check.read_text()) if args.check else None
    demand_record = json.loads(args.demand_check.read_text()) if args.demand_check else None
    results: dict[str, dict[str, object]] = {}
    demand_results: dict[str, object] = {}
    mismatches: list[str] = []
    print("| scenario | transitions | transfers | rejections (by rule) | cancels | step s (max) |")
    print("|---|---:|---:|---|---:|---:|")
    for blocks in sizes:
        for name in VARIANTS:
            key = f"{blocks}/{name}"
            result = run_scenario(blocks, name, args.steps)
            cov = result["coverage"]
            assert isinstance(cov, dict)
            print(
                f"| {key} | {cov['transitions']} | {cov['transfers']} | {cov['rejections']} "
                f"{cov['rejections_by_rule']} | {cov['cancels']} | "
                f"{max(result['step_s']):.3f} |",  # type: ignore[arg-type]
                flush=True,
            )
            results[key] = {"steps": result["steps"], "state": result["state"]}
            demand_results[key] = result["demand"]
            if record is not None:
                mismatches += _compare(key, record.get(key), results[key])
            if demand_record is not None:
                mismatches += _compare_demand(key, demand_record.get(key), result["demand"])
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"saved {len(results)} scenarios to {args.save}")
    if args.demand_save:
        args.demand_save.parent.mkdir(parents=True, exist_ok=True)
        args.demand_save.write_text(json.dumps(demand_results, indent=1, sort_keys=True) + "\n")
        print(f"saved the demand_encoding hashes of {len(results)} scenarios to {args.demand_save}")
    for line in mismatches[:40]:
        print(line)
    ok = not mismatches
    print(json.dumps({"bench": "policy_identity", "scenarios": len(results), "identical": ok}))
    if not ok:
        sys.exit(1)


def _compare_demand(key: str, recorded: object, got: object) -> list[str]:
    if not isinstance(recorded, list) or not isinstance(got, list):
        return [f"{key}: demand_encoding not in the record"]
    return [
        f"{key} step {i}: {', '.join(sorted(k for k in new if old.get(k) != new[k]))}"
        for i, (old, new) in enumerate(zip(recorded, got, strict=False))
        if old != new
    ]


def _compare(key: str, recorded: object, got: dict[str, object]) -> list[str]:
    if not isinstance(recorded, dict):
        return [f"{key}: not in the record"]
    out = []
    for i, (old, new) in enumerate(zip(recorded["steps"], got["steps"], strict=False)):  # type: ignore[arg-type]
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            out.append(f"{key} step {i}: {', '.join(differ)}")
    old_state, new_state = recorded["state"], got["state"]
    assert isinstance(old_state, dict) and isinstance(new_state, dict)
    differ = sorted(
        k for k in set(old_state) | set(new_state) if old_state.get(k) != new_state.get(k)
    )
    if differ:
        out.append(f"{key} state: {', '.join(differ)}")
    return out


if __name__ == "__main__":
    main()
