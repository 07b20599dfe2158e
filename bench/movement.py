"""Moving a block between tiers, against a plain memory copy and against Ray's own transfer.

One run on a two-node ``ray.cluster_utils.Cluster`` on this machine (each node its own raylet and
object store). The tier actors are the pool's own (``actors.tier.TierActor``): a HOST tier and an
emulated HBM tier on node A, an emulated HBM tier on node B. One block of ``--mib`` MiB (random
float32) is imported into a storage tier and copied to the HOST tier; then, ``--repeats`` times:

- intra-node: HOST -> HBM on node A through the executor's path (``receive`` on the destination,
  given the source copy's reference: map the source object without copying, copy it into the
  destination's own object while a second thread computes its xxh3 checksum, keep the copy if the
  checksum matches), against ``numpy.copyto`` of the same bytes into a warm,
  pre-allocated buffer in one process (the best case of a plain memory copy);
- cross-node: HOST on node A -> HBM on node B by the route the executor takes for it
  (``actors.executor.by_group``: for a block this large, the pool's collective group of memory
  tiers, ``actors.peer.PeerGroup``: gloo send/receive of the parts, each chunk's checksum computed
  while the next arrives, then the same verify-and-keep), against Ray's raw transfer of the same
  bytes (an actor on node B ``ray.get``-ing a numpy array an actor on node A put); also the same
  copy by Ray's object transfer (``receive`` given the source copy's reference: the executor's
  fallback when the group cannot form), reported beside it;
- peer: HBM on node A -> HBM on node B through the same group.

Every copy is verified against the block's xxh3 checksum before it is kept. Each destination copy
is dropped before the next repeat; the paths take turns within each repeat. Figures are medians
of the repeats, GB/s of block bytes; beside them, the median CPU seconds that the cluster's
processes spent on each timed copy (all nodes share this machine's CPUs) and the load average.
Prints a markdown table and, as its last line, one JSON object.

    python bench/movement.py --quick --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.executor import by_group
from actors.peer import Member, PeerGroup
from actors.tier import TierActor
from pool.encoding import FULL
from pool.tiers import TierKind, TierSpec


@ray.remote(num_cpus=0)
class RawHolder:
    def put(self, nbytes: int) -> list:
        return [ray.put(np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8))]

    def fetch(self, handle: list) -> int:
        return int(ray.get(handle[0]).nbytes)


def on(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def cluster_cpu_s() -> float:
    """CPU seconds used so far by this process's children (the cluster's raylets, stores and
    workers); 0 where psutil is missing (the figures then read 0)."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue  # exited meanwhile
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="9 repeats (about 90 s)")
    parser.add_argument("--json", action="store_true", help="print the JSON summary last")
    parser.add_argument("--mib", type=int, default=256, help="block size (at least 256 MiB)")
    args = parser.parse_args()
    repeats = 9 if args.quick else 15
    nbytes = args.mib << 20

    store_mem = max(4 * nbytes, 1 << 30) + (256 << 20)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": store_mem,
            "include_dashboard": False,
        },
    )
    worker = cluster.add_node(num_cpus=1, object_store_memory=store_mem)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    a, b = cluster.head_node.node_id, worker.node_id
    tier = ray.remote(TierActor)
    root = tempfile.mkdtemp(prefix="weightpool-bench-movement-")

    def spec(tier_id: str, kind: TierKind, node: str, **kw) -> TierSpec:
        cap = None if kind is TierKind.STORAGE else 2 * nbytes
        return TierSpec(tier_id=tier_id, kind=kind, capacity_bytes=cap, node=node, **kw)

    try:
        storage = tier.options(scheduling_strategy=on(a), max_concurrency=4).remote(
            spec("a/storage", TierKind.STORAGE, a), root
        )
        host = tier.options(scheduling_strategy=on(a), max_concurrency=4).remote(
            spec("a/host", TierKind.HOST, a)
        )
        hbm_a = tier.options(scheduling_strategy=on(a), max_concurrency=4).remote(
            spec("a/hbm0", TierKind.HBM, a, device=0, emulated=True)
        )
        hbm_b = tier.options(scheduling_strategy=on(b), max_concurrency=4).remote(
            spec("b/hbm0", TierKind.HBM, b, device=0, emulated=True)
        )
        rows = nbytes // (4 * 4096)
        weights = {
            "block.weight": torch.randn(rows, 4096, generator=torch.Generator().manual_seed(0))
        }
        (block_spec,) = ray.get(storage.import_state_dict.remote(weights, "bench", (FULL,)))
        block = block_spec.block_id
        del weights
        entry, _ = ray.get(
            host.receive.remote(block, FULL, storage.export.remote(block_spec, FULL, FULL), 1, "")
        )

        def refresh_host() -> list:
            # A new source object each time: a receiver on another node must not find a copy
            # cached in its object store by an earlier pull.
            ray.get(host.drop.remote(block, FULL))
            _, handle = ray.get(
                host.receive.remote(
                    block, FULL, storage.export.remote(block_spec, FULL, FULL), 1, entry.checksum
                )
            )
            return handle

        figures: dict[str, list[float]] = {}
        cpu_s: dict[str, list[float]] = {}

        def timed(path: str, copy: Callable[[], object]) -> None:
            """Run ``copy`` once; record its GB/s and the cluster's CPU seconds under ``path``."""
            cpu = cluster_cpu_s()
            start = time.perf_counter()
            copy()
            seconds = time.perf_counter() - start
            cpu_s.setdefault(path, []).append(cluster_cpu_s() - cpu)
            figures.setdefault(path, []).append(entry.nbytes / seconds / 1e9)

        def received(dst, handle: list) -> Callable[[], object]:
            # As the executor does: the source copy's reference (returned by its own receive)
            # goes straight to the destination, which pulls, verifies and keeps it.
            return lambda: ray.get(dst.receive.remote(block, FULL, handle, 2, entry.checksum))

        group = PeerGroup("bench-movement", timeout_s=120)
        members = [
            Member("a/host", "1", host),
            Member("a/hbm0", "1", hbm_a),
            Member("b/hbm0", "1", hbm_b),
        ]
        # The route the executor takes for this copy (asserted, so the figure is the pool's path).
        assert by_group(TierKind.HOST, TierKind.HBM, True, True, entry.nbytes)

        def grouped(src: str, dst: str) -> Callable[[], object]:
            return lambda: group.copy(members, src, dst, block, FULL, 3, entry.checksum)

        def intra() -> None:
            timed("intra", received(hbm_a, refresh_host()))
            ray.get(hbm_a.drop.remote(block, FULL))

        def cross() -> None:
            refresh_host()
            timed("cross", grouped("a/host", "b/hbm0"))
            ray.get(hbm_b.drop.remote(block, FULL))

        def cross_object() -> None:
            timed("cross_object", received(hbm_b, refresh_host()))
            ray.get(hbm_b.drop.remote(block, FULL))

        src = np.random.default_rng(1).integers(0, 255, entry.nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        np.copyto(dst, src)

        def memcpy() -> None:
            timed("memcpy", lambda: np.copyto(dst, src))

        holder_a = RawHolder.options(scheduling_strategy=on(a)).remote()
        holder_b = RawHolder.options(scheduling_strategy=on(b)).remote()

        def raw() -> None:
            handle = ray.get(holder_a.put.remote(entry.nbytes))
            timed("raw", lambda: ray.get(holder_b.fetch.remote(handle)))

        def peer() -> None:
            ray.get(
                hbm_a.receive.remote(
                    block, FULL, host.export.remote(block_spec, FULL, FULL), 2, entry.checksum
                )
            )
            timed("peer", grouped("a/hbm0", "b/hbm0"))
            ray.get([hbm_b.drop.remote(block, FULL), hbm_a.drop.remote(block, FULL)])

        paths = (intra, memcpy, cross, raw, cross_object, peer)
        load_start = os.getloadavg()[0]
        for path in paths:  # warm-up: first-touch of object-store pages; the group forms
            path()
        figures.clear()
        cpu_s.clear()
        for _ in range(repeats):  # the paths take turns within each repeat
            for path in paths:
                path()
        load_end = os.getloadavg()[0]
    finally:
        ray.shutdown()
        cluster.shutdown()

    med = {k: round(statistics.median(v), 3) for k, v in figures.items()}
    cpu = {k: round(statistics.median(v), 3) for k, v in cpu_s.items()}
    result = {
        "bench": "movement",
        "block_mib": round(entry.nbytes / 2**20, 1),
        "intra_node_gbps": med["intra"],
        "memcpy_gbps": med["memcpy"],
        "cross_node_gbps": med["cross"],
        "ray_raw_cross_node_gbps": med["raw"],
        "peer_cross_node_gbps": med["peer"],
        "cross_node_object_transfer_gbps": med["cross_object"],
        "intra_vs_memcpy": round(med["intra"] / med["memcpy"], 3),
        "cross_vs_ray_raw": round(med["cross"] / med["raw"], 3),
        "peer_vs_ray_raw": round(med["peer"] / med["raw"], 3),
        "object_transfer_vs_ray_raw": round(med["cross_object"] / med["raw"], 3),
        "cluster_cpu_s_median": cpu,
        "load_avg_1m": [round(load_start, 2), round(load_end, 2)],
        "repeats": repeats,
        "hbm_emulated": True,
    }

    def vs_raw(key: str) -> str:
        return f"{round(med[key] / med['raw'], 3)}x Ray raw"

    rows = [
        ("HOST -> HBM, same node (object store)", "intra", f"{result['intra_vs_memcpy']}x memcpy"),
        ("memcpy (numpy.copyto, one process)", "memcpy", ""),
        ("HOST -> HBM, across nodes (group: the pool's route)", "cross", vs_raw("cross")),
        ("HOST -> HBM, across nodes (object transfer)", "cross_object", vs_raw("cross_object")),
        ("HBM -> HBM, across nodes (group)", "peer", vs_raw("peer")),
        ("Ray raw transfer across nodes", "raw", ""),
    ]
    print(f"load average (1 min) {load_start:.2f} at start, {load_end:.2f} at end")
    print("| path | GB/s (median) | ratio | cluster CPU s (median) |")
    print("|---|---:|---:|---:|")
    for label, key, ratio in rows:
        print(f"| {label} | {med[key]} | {ratio} | {cpu[key]} |")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
