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
- cross-node: HOST on node A -> HBM on node B through the same path, against Ray's raw transfer
  of the same bytes (an actor on node B ``ray.get``-ing a numpy array an actor on node A put);
- peer: HBM on node A -> HBM on node B through the pool's collective group
  (``actors.peer.PeerGroup``: gloo send/receive of the parts, then the same verify-and-keep).

Every copy is verified against the block's xxh3 checksum before it is kept. Each destination copy
is dropped before the next repeat; the paths take turns within each repeat. Figures are medians
of the repeats, GB/s of block bytes. Prints a markdown table and, as its last line, one JSON
object.

    python bench/movement.py --quick --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5 repeats (about a minute)")
    parser.add_argument("--json", action="store_true", help="print the JSON summary last")
    parser.add_argument("--mib", type=int, default=256, help="block size (at least 256 MiB)")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
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

        def move(dst) -> float:
            # As the executor does: the source copy's reference (returned by its own receive)
            # goes straight to the destination, which pulls, verifies and keeps it.
            handle = refresh_host()
            start = time.perf_counter()
            ray.get(dst.receive.remote(block, FULL, handle, 2, entry.checksum))
            seconds = time.perf_counter() - start
            ray.get(dst.drop.remote(block, FULL))
            return entry.nbytes / seconds / 1e9

        src = np.random.default_rng(1).integers(0, 255, entry.nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        np.copyto(dst, src)

        def memcpy() -> float:
            start = time.perf_counter()
            np.copyto(dst, src)
            return entry.nbytes / (time.perf_counter() - start) / 1e9

        holder_a = RawHolder.options(scheduling_strategy=on(a)).remote()
        holder_b = RawHolder.options(scheduling_strategy=on(b)).remote()

        def raw() -> float:
            handle = ray.get(holder_a.put.remote(entry.nbytes))
            start = time.perf_counter()
            ray.get(holder_b.fetch.remote(handle))
            seconds = time.perf_counter() - start
            del handle
            return entry.nbytes / seconds / 1e9

        group = PeerGroup("bench-movement", timeout_s=120)
        members = [Member("a/hbm0", "1", hbm_a), Member("b/hbm0", "1", hbm_b)]

        def peer() -> float:
            start = time.perf_counter()
            group.copy(members, "a/hbm0", "b/hbm0", block, FULL, 3, entry.checksum)
            seconds = time.perf_counter() - start
            ray.get(hbm_b.drop.remote(block, FULL))
            return entry.nbytes / seconds / 1e9

        figures: dict[str, list[float]] = {
            "intra": [],
            "memcpy": [],
            "cross": [],
            "raw": [],
            "peer": [],
        }
        move(hbm_a), move(hbm_b), raw()  # warm-up: first-touch of object-store pages
        ray.get(
            hbm_a.receive.remote(
                block, FULL, host.export.remote(block_spec, FULL, FULL), 2, entry.checksum
            )
        )
        peer()  # warm-up, and the group forms
        ray.get(hbm_a.drop.remote(block, FULL))
        for _ in range(repeats):
            figures["intra"].append(move(hbm_a))
            figures["memcpy"].append(memcpy())
            figures["cross"].append(move(hbm_b))
            figures["raw"].append(raw())
            ray.get(
                hbm_a.receive.remote(
                    block, FULL, host.export.remote(block_spec, FULL, FULL), 2, entry.checksum
                )
            )
            figures["peer"].append(peer())
            ray.get(hbm_a.drop.remote(block, FULL))
    finally:
        ray.shutdown()
        cluster.shutdown()

    med = {k: round(statistics.median(v), 3) for k, v in figures.items()}
    result = {
        "bench": "movement",
        "block_mib": round(entry.nbytes / 2**20, 1),
        "intra_node_gbps": med["intra"],
        "memcpy_gbps": med["memcpy"],
        "cross_node_gbps": med["cross"],
        "ray_raw_cross_node_gbps": med["raw"],
        "peer_cross_node_gbps": med["peer"],
        "intra_vs_memcpy": round(med["intra"] / med["memcpy"], 3),
        "cross_vs_ray_raw": round(med["cross"] / med["raw"], 3),
        "peer_vs_ray_raw": round(med["peer"] / med["raw"], 3),
        "repeats": repeats,
        "hbm_emulated": True,
    }
    print("| path | GB/s (median) | ratio |")
    print("|---|---:|---:|")
    print(f"| HOST -> HBM, same node | {med['intra']} | {result['intra_vs_memcpy']}x memcpy |")
    print(f"| memcpy (numpy.copyto) | {med['memcpy']} | |")
    print(f"| HOST -> HBM, across nodes | {med['cross']} | {result['cross_vs_ray_raw']}x Ray |")
    print(f"| Ray raw transfer across nodes | {med['raw']} | |")
    peer_ratio = result["peer_vs_ray_raw"]
    print(f"| HBM -> HBM across nodes, peer group (gloo) | {med['peer']} | {peer_ratio}x Ray |")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
