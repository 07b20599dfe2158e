"""A fine-tuned variant made resident by regeneration against the same variant copied, one run.

On an embedded local Ray, a pool with room for everything loads MiniLM (the real checkpoint) and
waits until it is resident. Then, alternating, it registers variants of it, each with a rank-16
low-rank delta (a LoRA adapter, its own random factors) merged into every attention and
feed-forward matrix of the encoder:

- ``regenerate``: by ``Pool.load_adapter``: each adapted block is rebuilt in HBM from the base's
  copy there and its factors; every other block shares the base's copy (tied);
- ``copy``: the same tensors by ``Pool.load_state_dict`` without recipes, moved as any model is
  (storage -> host -> HBM).

For each: the seconds from the call that loads it (its import into storage included, the merge
of the deltas too) until every block of the variant is PREMIUM, the bytes moved into HBM (the
controller's ``bytes:*->hbm`` and ``bytes:regenerate`` counters), and the bytes the HBM tier
holds more afterwards, and the bytes of block files added to storage (equal blocks are stored
once: a variant's unchanged blocks name the base's files). HBM is emulated (no GPU here); the
rebuild runs on the HBM tier actor's CPU.

    python bench/regen.py --json

``--tight K`` measures instead whether the policy counts shared copies once: the HBM tier gets
room for MiniLM and K variants registered by ``load_adapter`` as they really cost it (each its
merged blocks and factors; the rest shares the base's copies), less the policy's headroom, plus
1 MiB. It loads the base and the K variants, waits until the pool is idle, and reports how many
of the variants' blocks are PREMIUM and the HBM bytes held. A policy that counted each shared
copy again would see every variant at a full model's size and leave blocks out.

    python bench/regen.py --tight 3 --json
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

from safetensors.torch import load_file

from actors.config import PoolConfig
from actors.pool import Pool, start_pool, stop_pool
from api.models import minilm_checkpoint
from pool.importer import StateDictSource, plan_blocks
from pool.regen import adapter_state

NAMESPACE = "bench-regen"
RANK = 16
ADAPTED = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def adapter(
    state: dict[str, torch.Tensor], seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A rank-``RANK`` adapter's factors for every encoder matrix; each seed its own."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for key, tensor in state.items():
        adapted = any(f".{name}.weight" in key for name in ADAPTED)
        if key.startswith("encoder.") and adapted and tensor.dim() == 2:
            out_dim, in_dim = tensor.shape
            up = torch.randn(out_dim, RANK, generator=generator) * 0.01
            factors[key] = (up, torch.randn(RANK, in_dim, generator=generator) * 0.01)
    return factors


def hbm_bytes(pool: Pool, home: str) -> int:
    return int(ray.get(pool.tier(home).report.remote()).used_bytes)


def stored_bytes(storage: str) -> int:
    """Bytes of the block files under the storage directory (the disk a variant costs)."""
    return sum(p.stat().st_size for p in Path(storage).rglob("*.arrow"))


def moved_to_hbm(counters: dict[str, int]) -> int:
    return sum(v for k, v in counters.items() if k.endswith("->hbm") or k == "bytes:regenerate")


def wait_premium(pool: Pool, model: str, timeout_s: float = 300.0) -> None:
    blocks = [s.block_id for s in ray.get(pool.controller.model_blocks.remote(model))[1]]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = ray.get([pool.controller.block_state.remote(b) for b in blocks])
        if set(states) == {"premium"} and ray.get(pool.controller.idle.remote()):
            return
        time.sleep(0.05)
    raise SystemExit(f"{model} did not become resident in {timeout_s} s")


def variant_bytes(base_state: dict[str, torch.Tensor], factors: dict) -> int:
    """What a variant by ``load_adapter`` adds to HBM: its merged blocks and its factors."""
    bases = {s.block_id: s for s in plan_blocks(StateDictSource(base_state), "minilm")}
    adapted = {f"minilm/{key.rsplit('.', 1)[0]}" for key in factors}
    merged = sum(bases[b].full_nbytes for b in adapted)
    return merged + sum(up.nbytes + down.nbytes for up, down in factors.values())


def wait_idle(pool: Pool, timeout_s: float = 120.0) -> None:
    """Until the controller has nothing queued or running for 2 s in a row."""
    deadline, quiet_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if ray.get(pool.controller.idle.remote()):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 2.0:
                return
        else:
            quiet_since = None
        time.sleep(0.05)
    raise SystemExit(f"the pool was not idle within {timeout_s} s")


def tight(variants: int, as_json: bool) -> None:
    base_state = load_file(str(minilm_checkpoint()))
    factors = adapter(base_state)
    base = sum(s.full_nbytes for s in plan_blocks(StateDictSource(base_state), "minilm"))
    variant = variant_bytes(base_state, factors)
    headroom = PoolConfig().policy.hbm_headroom_fraction
    hbm = int((base + variants * variant) / (1 - headroom)) + (1 << 20)
    ray.init(address="local", num_cpus=2, object_store_memory=2 << 30, include_dashboard=False)
    storage = tempfile.mkdtemp(prefix="weightpool-bench-regen-")
    pool = start_pool(
        PoolConfig(namespace=NAMESPACE, storage_dir=storage, hbm_bytes_per_device=hbm)
    )
    try:
        home = pool.load_checkpoint(minilm_checkpoint(), "minilm")
        wait_premium(pool, "minilm")
        names = [f"ft-{i}" for i in range(variants)]
        for seed, name in enumerate(names):
            pool.load_adapter("minilm", base_state, name, adapter(base_state, seed), scale=2.0)
        wait_idle(pool)
        blocks = [
            s.block_id for n in names for s in ray.get(pool.controller.model_blocks.remote(n))[1]
        ]
        states = ray.get([pool.controller.block_state.remote(b) for b in blocks])
        used = hbm_bytes(pool, home)
    finally:
        stop_pool(NAMESPACE)
        ray.shutdown()
    premium = sum(state == "premium" for state in states)
    print(
        f"HBM {hbm / 2**20:.1f} MiB: room for MiniLM ({base / 2**20:.1f} MiB) and {variants} "
        f"variants at {variant / 2**20:.1f} MiB each (a full copy would be {base / 2**20:.1f})"
    )
    print(f"variants' blocks PREMIUM: {premium} of {len(blocks)}; HBM held {used / 2**20:.1f} MiB")
    if as_json:
        print(
            json.dumps(
                {
                    "bench": "regen_tight",
                    "variants": variants,
                    "hbm_bytes": hbm,
                    "base_bytes": base,
                    "variant_bytes": variant,
                    "variant_blocks": len(blocks),
                    "variant_blocks_premium": premium,
                    "hbm_used_bytes": used,
                    "hbm_emulated": True,
                }
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="variants of each kind")
    parser.add_argument("--json", action="store_true", help="print the JSON summary last")
    parser.add_argument(
        "--tight", type=int, default=0, metavar="K", help="HBM for the base and K variants only"
    )
    args = parser.parse_args()
    if args.tight:
        tight(args.tight, args.json)
        return

    ray.init(address="local", num_cpus=2, object_store_memory=2 << 30, include_dashboard=False)
    storage = tempfile.mkdtemp(prefix="weightpool-bench-regen-")
    hbm = (args.rounds * 2 + 2) * (96 << 20)  # room for every variant as a full copy
    pool = start_pool(
        PoolConfig(namespace=NAMESPACE, storage_dir=storage, hbm_bytes_per_device=hbm)
    )
    results: dict[str, list[dict[str, float]]] = {"regenerate": [], "copy": []}
    try:
        base_state = load_file(str(minilm_checkpoint()))
        home = pool.load_checkpoint(minilm_checkpoint(), "minilm")
        wait_premium(pool, "minilm")
        factors = adapter(base_state)
        for round_ in range(args.rounds):
            for kind in ("regenerate", "copy"):
                name = f"ft-{kind}-{round_}"
                before_bytes = hbm_bytes(pool, home)
                before_disk = stored_bytes(storage)
                before = pool.status()["counters"]
                factors = adapter(base_state, seed=2 * round_ + (kind == "copy"))  # its own
                if kind == "regenerate":
                    start = time.perf_counter()  # load_adapter imports, then registers
                    pool.load_adapter("minilm", base_state, name, factors, scale=2.0)
                else:
                    start = time.perf_counter()  # the same merge, then a plain import
                    bases = plan_blocks(StateDictSource(base_state), "minilm")
                    state, _ = adapter_state(bases, base_state, name, factors, 2.0)  # no recipes
                    pool.load_state_dict(state, name, home, tie=False)
                loaded = time.perf_counter() - start
                wait_premium(pool, name)
                seconds = time.perf_counter() - start
                after = pool.status()["counters"]
                results[kind].append(
                    {
                        "to_premium_s": seconds,
                        "load_call_s": loaded,
                        "bytes_to_hbm": moved_to_hbm(after) - moved_to_hbm(before),
                        "hbm_bytes_added": hbm_bytes(pool, home) - before_bytes,
                        "storage_bytes_added": stored_bytes(storage) - before_disk,
                        "regenerations": after.get("regenerations", 0)
                        - before.get("regenerations", 0),
                    }
                )
        blocks = len(ray.get(pool.controller.model_blocks.remote("minilm"))[1])
    finally:
        stop_pool(NAMESPACE)
        ray.shutdown()

    summary = {
        kind: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for kind, runs in results.items()
    }
    print(
        f"MiniLM ({blocks} blocks) and variants with a rank-{RANK} delta in {len(factors)} matrices"
    )
    print(
        "| variant | to premium s (median) | of which the load call | MiB moved to HBM | "
        "HBM MiB added | storage MiB added | rebuilt |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, s in summary.items():
        print(
            f"| {kind} | {s['to_premium_s']:.2f} | {s['load_call_s']:.2f} | "
            f"{s['bytes_to_hbm'] / 2**20:.1f} | "
            f"{s['hbm_bytes_added'] / 2**20:.1f} | {s['storage_bytes_added'] / 2**20:.1f} | "
            f"{s['regenerations']:.0f} |"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "bench": "regen",
                    "rank": RANK,
                    "adapted_matrices": len(factors),
                    "rounds": args.rounds,
                    "hbm_emulated": True,
                    **{k: {m: round(v, 3) for m, v in s.items()} for k, s in summary.items()},
                    "runs": results,
                }
            )
        )


if __name__ == "__main__":
    main()
