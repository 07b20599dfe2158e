"""What only a GPU can check: the HBM tier in real device memory, its pinned staging buffers,
CUDA IPC handles of its copies, peer copies between devices, and host-to-device promotion
against a plain pinned torch copy.

On an embedded local Ray (one node), with the pool's own tier actors (``actors.tier.TierActor``):
a STORAGE tier, a HOST tier and an HBM tier on device 0 (not emulated: it must find CUDA, or the
check fails). One block of ``--mib`` MiB (random float32) is imported and copied to the HOST
tier; then, ``--repeats`` times, interleaved:

- promotion: HOST -> HBM through the real path (``export`` on the source, ``receive`` on the
  destination: map the host object, copy the host mirror, verify the xxh3 checksum, upload to
  the device through two pinned staging buffers), dropped after each repeat;
- the baselines: ``torch.Tensor.copy_`` of the same number of bytes from a pinned host buffer to
  device memory (and from pageable memory), synchronized, in the driver.

Then: a consumer actor on the same node rebuilds the HBM copy's parts from their CUDA IPC handles
and checks them bit-exact (the xxh3 of the device bytes equals the copy's checksum); with two or
more devices, a peer copy device 0 -> device 1 through the pool's collective group (gloo over the
host mirrors: an NCCL path is not built), checked the same way. Prints a markdown table and, as
its last line, one JSON object. Without CUDA it prints ``skipped: no CUDA`` and a JSON line, and
exits 0.

    python bench/gpu_check.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def skip(reason: str, as_json: bool) -> None:
    print(f"skipped: {reason}")
    if as_json:
        print(json.dumps({"bench": "gpu_check", "skipped": reason}))


def timed_copy(src: torch.Tensor, dst: torch.Tensor) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return src.nbytes / (time.perf_counter() - start) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print the JSON summary last")
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--mib", type=int, default=256, help="block size")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        skip("no CUDA", args.json)
        return 0
    import ray

    from actors.peer import Member, PeerGroup
    from actors.tier import TierActor
    from pool.encoding import FULL
    from pool.tiers import TierKind, TierSpec

    repeats = 3 if args.quick else 7
    nbytes = args.mib << 20
    devices = torch.cuda.device_count()
    ray.init(
        address="local",
        num_cpus=4,
        num_gpus=devices,
        object_store_memory=max(6 * nbytes, 2 << 30),
        include_dashboard=False,
        log_to_driver=False,
    )
    tier = ray.remote(TierActor).options(max_concurrency=4, num_cpus=0)
    root = tempfile.mkdtemp(prefix="weightpool-gpu-check-")
    node = ray.get_runtime_context().get_node_id()

    def spec(tier_id: str, kind: TierKind, **kw: Any) -> TierSpec:
        cap = None if kind is TierKind.STORAGE else 2 * nbytes
        return TierSpec(tier_id=tier_id, kind=kind, capacity_bytes=cap, node=node, **kw)

    @ray.remote(num_cpus=0)
    class Consumer:
        """Another process on the node: opens a copy's CUDA IPC handles, hashes the bytes."""

        def checksum(self, handles: list[Any]) -> str:
            import xxhash

            digest = xxhash.xxh3_128()
            for rebuild, rebuild_args in handles:
                digest.update(rebuild(*rebuild_args).cpu().numpy().data)
            return digest.hexdigest()

    try:
        storage = tier.remote(spec("n/storage", TierKind.STORAGE), root)
        host = tier.remote(spec("n/host", TierKind.HOST))
        hbm = [
            tier.remote(spec(f"n/hbm{d}", TierKind.HBM, device=d, emulated=False))
            for d in range(min(devices, 2))
        ]
        reports = ray.get([h.report.remote() for h in hbm])
        if any(r.emulated for r in reports):
            raise SystemExit("the HBM tier actor found no CUDA (it reports itself emulated)")
        gen = torch.Generator().manual_seed(0)
        weights = {"block.weight": torch.randn(nbytes // (4 * 4096), 4096, generator=gen)}
        (block_spec,) = ray.get(storage.import_state_dict.remote(weights, "gpu", (FULL,)))
        block = block_spec.block_id
        del weights
        entry, _ = ray.get(
            host.receive.remote(block, FULL, storage.export.remote(block_spec, FULL, FULL), 1, "")
        )

        def promote() -> float:
            start = time.perf_counter()
            ray.get(
                hbm[0].receive.remote(
                    block, FULL, host.export.remote(block_spec, FULL, FULL), 2, entry.checksum
                )
            )
            seconds = time.perf_counter() - start
            ray.get(hbm[0].drop.remote(block, FULL))
            return entry.nbytes / seconds / 1e9

        pinned = torch.empty(entry.nbytes, dtype=torch.uint8, pin_memory=True)
        pageable = torch.empty(entry.nbytes, dtype=torch.uint8)
        pinned.fill_(1)
        pageable.fill_(1)
        on_device = torch.empty(entry.nbytes, dtype=torch.uint8, device="cuda:0")
        figures: dict[str, list[float]] = {"promotion": [], "pinned": [], "pageable": []}
        promote(), timed_copy(pinned, on_device), timed_copy(pageable, on_device)  # warm-up
        for _ in range(repeats):
            figures["promotion"].append(promote())
            figures["pinned"].append(timed_copy(pinned, on_device))
            figures["pageable"].append(timed_copy(pageable, on_device))

        ray.get(
            hbm[0].receive.remote(
                block, FULL, host.export.remote(block_spec, FULL, FULL), 3, entry.checksum
            )
        )
        consumer = Consumer.remote()
        ipc_sum = ray.get(consumer.checksum.remote(ray.get(hbm[0].ipc_handles.remote(block, FULL))))
        ipc_ok = ipc_sum == entry.checksum
        if len(hbm) > 1:
            members = [Member(f"n/hbm{d}", "1", h) for d, h in enumerate(hbm)]
            group = PeerGroup("gpu-check", timeout_s=60)
            start = time.perf_counter()
            group.copy(members, "n/hbm0", "n/hbm1", block, FULL, 4, entry.checksum)
            peer_s = time.perf_counter() - start
            handles = ray.get(hbm[1].ipc_handles.remote(block, FULL))
            peer_ok = ray.get(consumer.checksum.remote(handles)) == entry.checksum
            peer = (
                f"ok, bit-exact {peer_ok}, {entry.nbytes / peer_s / 1e9:.2f} GB/s ({group.backend})"
            )
        else:
            peer_ok, peer = None, "skipped: one device"
        name = torch.cuda.get_device_name(0)
    finally:
        ray.shutdown()

    med = {k: round(statistics.median(v), 3) for k, v in figures.items()}
    result = {
        "bench": "gpu_check",
        "device": name,
        "block_mib": round(entry.nbytes / 2**20, 1),
        "h2d_promotion_gbps": med["promotion"],
        "pinned_torch_copy_gbps": med["pinned"],
        "pageable_torch_copy_gbps": med["pageable"],
        "promotion_vs_pinned": round(med["promotion"] / med["pinned"], 3),
        "ipc_bit_exact": ipc_ok,
        "peer_bit_exact": peer_ok,
        "repeats": repeats,
    }
    print(f"Device: {name} ({devices} visible)\n")
    print("| check | result |")
    print("|---|---|")
    print(
        f"| HOST -> HBM promotion (map, mirror, verify, staged upload) | {med['promotion']} GB/s |"
    )
    print(f"| plain pinned torch copy, host -> device | {med['pinned']} GB/s |")
    print(f"| plain pageable torch copy, host -> device | {med['pageable']} GB/s |")
    print(f"| promotion / pinned copy | {result['promotion_vs_pinned']}x |")
    print(f"| CUDA IPC handles, rebuilt in another process, bit-exact | {ipc_ok} |")
    print(f"| peer copy device 0 -> 1 | {peer} |")
    if args.json:
        print(json.dumps(result))
    return 0 if ipc_ok and peer_ok is not False else 1


if __name__ == "__main__":
    sys.exit(main())
