"""The main job's MoE model through the pool against the plain model, request by request.

One run on an embedded local Ray (one node): a pool with one emulated HBM device of ``--hbm-mib``
MiB (96 by default; the model is 158 MiB at full precision), the main job's OLMoE-architecture
model (``api.main_job.build_moe``: 6 layers, 16 experts, top-2, seeded random weights),
calibrated (``pool.calibration.calibrate``) and loaded with FULL, INT8 and INT4 encodings, then
managed (``actors.integration.manage``). Requests are the main job's: 2 sequences, an 8-token
prompt, 8 tokens decoded with a KV cache.

After ``--warmup`` managed requests (leases taken, the policy settled), four variants take turns,
request by request, on the same prompts:

- ``plain grouped_mm``: the unmanaged model with transformers' default experts implementation;
- ``plain eager``: the unmanaged model with the eager per-expert loop;
- ``managed workspace``: the managed model with ``grouped_mm``, whose fused parameters need every
  expert in one tensor: each call copies its routed experts into a workspace;
- ``managed views``: the managed model with the eager loop (``manage``'s default), reading each
  routed expert's leased tensor in place.

``--precision-hysteresis off`` runs the policy without ``PolicyConfig.precision_hysteresis``
(on by default) to show what it changes: the controller's transitions and
lease recalls during the timed requests are reported either way. Prints a markdown table and,
as its last line, one JSON object.

    python bench/moe_overhead.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.client import PoolClient
from actors.config import PoolConfig
from actors.integration import manage
from actors.pool import Pool, start_pool, stop_pool
from api.main_job import DEMO_ENCODINGS, VOCAB, _generate, build_moe
from policy.config import PolicyConfig
from pool.calibration import OutputForward, calibrate
from pool.importer import StateDictSource, plan_blocks

MIB = 1 << 20
NAMESPACE = "bench-moe-overhead"
VARIANTS = ("plain grouped_mm", "plain eager", "managed workspace", "managed views")


def counters(pool: Pool) -> dict[str, int]:
    values: dict[str, int] = ray.get(pool.controller.counter_values.remote())
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hbm-mib", type=int, default=96, help="emulated HBM (MiB)")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds of 4 prompts each")
    parser.add_argument("--warmup", type=int, default=8, help="managed requests before timing")
    parser.add_argument(
        "--precision-hysteresis", choices=("on", "off"), default="on", help="policy flag"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON summary last")
    args = parser.parse_args()
    torch.set_num_threads(1)  # see README "Threads"
    ray.init(
        address="local", log_to_driver=False, logging_level="ERROR", object_store_memory=768 * MIB
    )
    store = tempfile.mkdtemp(prefix="weightpool-moe-overhead-")
    policy = PolicyConfig(
        tick_s=0.05, quality_budget=1e-3, precision_hysteresis=args.precision_hysteresis == "on"
    )
    config = PoolConfig(
        namespace=NAMESPACE,
        storage_dir=store,
        hbm_bytes_per_device=args.hbm_mib * MIB,
        emulated_devices_per_node=1,
        host_bytes=512 * MIB,
        encodings=tuple(e.name for e in DEMO_ENCODINGS),
        policy=policy,
    )
    try:
        pool = start_pool(config)
        plain = build_moe(0)
        specs = plan_blocks(StateDictSource(plain), "moe")
        generator = torch.Generator().manual_seed(0)
        probe = torch.randint(2, VOCAB, (8, 8), generator=generator)
        print("calibrating the MoE model ...", file=sys.stderr)
        calibration = calibrate(
            plain, None, specs, outputs=OutputForward(lambda m=plain: m(probe).logits[:, -1])
        )
        prompts = [torch.randint(2, VOCAB, (2, 8), generator=generator) for _ in range(4)]
        state = {k: v.clone() for k, v in plain.state_dict().items()}
        pool.load_state_dict(state, "moe", encodings=DEMO_ENCODINGS, calibration=calibration)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        with PoolClient(namespace=NAMESPACE) as client:
            managed = manage(build_moe(0), client, "moe")
            for i in range(args.warmup):
                _generate(managed.model, prompts[i % len(prompts)])
            before = counters(pool)
            for _ in range(args.rounds):
                for prompt in prompts:
                    for impl in ("grouped_mm", "eager"):
                        plain.set_experts_implementation(impl)
                        managed.model.set_experts_implementation(impl)
                        kind = "views" if impl == "eager" else "workspace"
                        for name, model in (
                            (f"plain {impl}", plain),
                            (f"managed {kind}", managed.model),
                        ):
                            start = time.perf_counter()
                            _generate(model, prompt)
                            times[name].append(time.perf_counter() - start)
            after = counters(pool)
    finally:
        stop_pool(NAMESPACE)
        ray.shutdown()
    medians = {v: 1000 * statistics.median(times[v]) for v in VARIANTS}
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    transitions = sum(v for k, v in delta.items() if k.startswith("transition:"))
    base = medians["plain grouped_mm"]
    print(f"\nMoE requests, median ms ({len(times[VARIANTS[0]])} each, alternating; HBM ", end="")
    print(f"{args.hbm_mib} MiB, precision hysteresis {args.precision_hysteresis})\n")
    print("| variant | median ms | / plain grouped_mm |")
    print("|---|---:|---:|")
    for v in VARIANTS:
        print(f"| {v} | {medians[v]:.1f} | {medians[v] / base:.2f} |")
    print(
        f"\nDuring the timed requests: {transitions} transitions, "
        f"{delta.get('lease_recalls', 0)} lease recalls, {delta.get('lease_misses', 0)} lease "
        f"misses, {delta.get('bytes:host->hbm', 0) / MIB:.1f} MiB host->hbm, "
        f"{delta.get('execute_errors', 0)} failed transitions, "
        f"{delta.get('copies_retried_for_room', 0)} copies retried for room."
    )
    if args.json:
        summary = {
            "bench": "moe_overhead",
            "hbm_mib": args.hbm_mib,
            "precision_hysteresis": args.precision_hysteresis == "on",
            "requests_per_variant": len(times[VARIANTS[0]]),
            **{f"{v.replace(' ', '_')}_ms_median": round(medians[v], 2) for v in VARIANTS},
            "views_ratio": round(medians["managed views"] / base, 3),
            "workspace_ratio": round(medians["managed workspace"] / base, 3),
            "transitions": transitions,
            "lease_recalls": delta.get("lease_recalls", 0),
            "lease_misses": delta.get("lease_misses", 0),
            "execute_errors": delta.get("execute_errors", 0),
            "copies_retried_for_room": delta.get("copies_retried_for_room", 0),
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
