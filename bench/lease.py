"""The lease path against a plain Ray actor call, measured in one run on a local Ray.

A pool is started on an embedded local Ray with 24 MiB of emulated HBM, and a model of 64 blocks
of 1 MiB (random float32 weights, so that most blocks cannot be resident at once) is loaded into
it. Then, with one ``PoolClient``:

- hit: ``client.get(block)`` of a block this client already leases (served from the client's
  lease cache, in-process), timed call by call with ``time.perf_counter_ns``;
- miss: ``client.get(block)`` of a block with no HBM copy: the controller makes it a demand
  promotion (host -> HBM, evicting another block), grants the lease, and the client maps and
  decodes the copy; the block is released after each, so misses stay misses;
- a plain Ray actor call (``ray.get(actor.ping.remote())`` on an actor that returns a constant),
  the floor of any remote call, timed the same way.

Prints a markdown table and, as its last line, one JSON object.

    python bench/lease.py --quick --json
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
from actors.pool import start_pool, stop_pool

NAMESPACE = "bench-lease"


@ray.remote(num_cpus=0)
class Echo:
    def ping(self) -> int:
        return 0


def timed_us(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - start) / 1e3)
    return out


def wait_settled(pool, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.get(pool.controller.idle.remote()) and pool.status()["counters"].get("steps", 0) > 5:
            return
        time.sleep(0.2)
    raise SystemExit("the pool did not settle")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples (about a minute)")
    parser.add_argument("--json", action="store_true", help="print the JSON summary last")
    args = parser.parse_args()
    hits, misses, calls = (20_000, 15, 500) if args.quick else (200_000, 60, 5_000)

    ray.init(num_cpus=2, object_store_memory=600 << 20, include_dashboard=False)
    storage = tempfile.mkdtemp(prefix="weightpool-bench-lease-")
    config = PoolConfig(namespace=NAMESPACE, storage_dir=storage, hbm_bytes_per_device=24 << 20)
    pool = start_pool(config)
    try:
        generator = torch.Generator().manual_seed(0)
        weights = {
            f"layers.{i}.weight": torch.randn(512, 512, generator=generator) for i in range(64)
        }
        pool.load_state_dict(weights, "synthetic")
        wait_settled(pool)
        small = ray.get(pool.storage().specs.remote())

        def resident(block_id: str) -> bool:
            return any(
                "/hbm" in t and state == "ready"
                for t, _, state, _ in ray.get(pool.controller.copies.remote(block_id))
            )

        with PoolClient(namespace=NAMESPACE) as client:
            hot = next(s.block_id for s in small if resident(s.block_id))
            client.get(hot)
            hit_us = timed_us(lambda: client.get(hot), hits)
            miss_ms = []
            for _ in range(misses):
                cold = next((s.block_id for s in small if not resident(s.block_id)), None)
                if cold is None:
                    break
                start = time.perf_counter()
                client.get(cold)
                miss_ms.append((time.perf_counter() - start) * 1e3)
                client.release([cold])
        echo = Echo.remote()
        ray.get(echo.ping.remote())
        call_us = timed_us(lambda: ray.get(echo.ping.remote()), calls)
    finally:
        stop_pool(NAMESPACE)
        ray.shutdown()

    result = {
        "bench": "lease",
        "hit_us_median": round(statistics.median(hit_us), 3),
        "miss_ms_median": round(statistics.median(miss_ms), 3) if miss_ms else None,
        "ray_actor_call_us_median": round(statistics.median(call_us), 1),
        "hits": len(hit_us),
        "misses": len(miss_ms),
        "calls": len(call_us),
        "hbm_emulated": True,
    }
    print("| path | median | samples |")
    print("|---|---:|---:|")
    print(f"| lease hit (client cache) | {result['hit_us_median']} us | {len(hit_us)} |")
    print(f"| lease miss (demand promotion) | {result['miss_ms_median']} ms | {len(miss_ms)} |")
    print(f"| plain Ray actor call | {result['ray_actor_call_us_median']} us | {len(call_us)} |")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
