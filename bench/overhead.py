"""The real model's forward through the pool against the plain model, and the guardrail's effect.

All in one run, on an embedded local Ray (one node, emulated HBM), with all-MiniLM-L6-v2 (87 MiB):

- resident: a pool whose HBM holds the whole model; the model is managed (``actors.integration.
  manage``) with every block resident and leased, and its forward timed against the plain
  (unmanaged) model's, interleaved forward by forward on the same batch: ``resident_ratio`` is
  the ratio of the medians. The managed outputs are checked bit-exact first;
- budget 0.5: a second pool whose HBM is half the model's full-precision bytes, the model loaded
  with its calibration (``pool.calibration.calibrate``: sensitivities and floors) and a quality
  budget, so that the policy must demote or stream blocks: ``budget_0.5_ratio`` likewise, and
  ``cosine_veto_on``, the lowest cosine similarity, over held-out texts, between the managed
  model's sentence embeddings and the unmanaged model's;
- veto off: every block held at INT4 whatever its floor (naive static all-INT4, the values the
  INT4 codec serves): ``cosine_veto_off``, over the same texts.

Prints a markdown table and, as its last line, one JSON object.

    python bench/overhead.py --quick --json
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
from api.models import minilm_checkpoint
from policy.config import PolicyConfig
from pool.calibration import calibrate, held_at
from pool.encoding import Precision
from pool.importer import SafetensorsSource, plan_blocks
from pool.reference_model import CALIBRATION_TEXTS, cosines, embed, load_minilm, tokenize

MB = 1 << 20
# Held out from calibration: the cosine is measured on texts the sensitivities never saw.
EVAL_TEXTS = (
    "The library extended its opening hours during the exam period.",
    "A strong earthquake struck the coast early on Sunday morning.",
    "Can you recommend a good book about the history of mathematics?",
    "The new phone has a larger battery but a dimmer screen.",
    "Volunteers planted two thousand trees along the river bank.",
    "The judge postponed the hearing until further evidence is available.",
    "My grandmother makes the best apple pie in the whole village.",
    "Quantum computers use qubits that can exist in superposition.",
    "The airline cancelled dozens of flights because of the strike.",
    "He practised the violin for three hours every day before the concert.",
    "Sales of electric cars doubled in the first half of the year.",
    "The bridge was closed for repairs after inspectors found cracks.",
    "Drinking enough water helps the body regulate its temperature.",
    "The orchestra played Beethoven's ninth symphony to a full house.",
    "Our team will migrate the database to the new servers next month.",
    "The fox crept silently through the snow toward the henhouse.",
)


def wait_for(check, timeout_s: float = 180.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def settled(pool: Pool) -> bool:
    return (
        bool(ray.get(pool.controller.idle.remote()))
        and pool.status()["counters"].get("steps", 0) > 5
    )


def interleaved_ms(plain, managed, batch, n: int) -> tuple[list[float], list[float]]:
    """Forward times of both models, alternating, so that background load hits both alike."""
    plain_ms, managed_ms = [], []
    with torch.inference_mode():
        for i in range(n):
            order = (plain, managed) if i % 2 == 0 else (managed, plain)
            for model in order:
                start = time.perf_counter()
                model(**batch)
                elapsed = (time.perf_counter() - start) * 1e3
                (plain_ms if model is plain else managed_ms).append(elapsed)
    return plain_ms, managed_ms


def new_pool(name: str, storage: str, hbm_bytes: int, quality_budget: float) -> Pool:
    policy = PolicyConfig(tick_s=0.05, quality_budget=quality_budget)
    config = PoolConfig(
        namespace=name, storage_dir=storage, hbm_bytes_per_device=hbm_bytes, policy=policy
    )
    return start_pool(config)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples (a few minutes)")
    parser.add_argument("--json", action="store_true", help="print the JSON summary last")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--quality-budget", type=float, default=2e-4, help="the veto's bound on predicted drift"
    )
    args = parser.parse_args()
    resident_n, budget_n, calibration_texts = (100, 12, 8) if args.quick else (400, 40, 32)
    torch.set_num_threads(args.threads)

    checkpoint = minilm_checkpoint()
    plain, tokenizer = load_minilm(checkpoint)
    specs = plan_blocks(SafetensorsSource(checkpoint), "minilm")
    model_bytes = sum(s.full_nbytes for s in specs)
    batch = tokenize(tokenizer, list(EVAL_TEXTS[:8]))
    want = embed(plain, tokenizer, EVAL_TEXTS)

    ray.init(address="local", num_cpus=2, object_store_memory=700 * MB, include_dashboard=False)
    storage = tempfile.mkdtemp(prefix="weightpool-bench-overhead-")
    result: dict[str, object] = {"bench": "overhead"}
    rows = []
    try:
        # 1. Resident: HBM holds everything; every block leased once, then cache hits only.
        pool = new_pool("bench-resident", f"{storage}/resident", 128 * MB, args.quality_budget)
        pool.load_checkpoint(checkpoint, "minilm")
        wait_for(lambda: pool.status()["states"] == {"premium": len(specs)}, what="resident")
        model, _ = load_minilm(checkpoint)
        with PoolClient(namespace="bench-resident") as client:
            managed = manage(model, client, "minilm")
            bit_exact = torch.equal(embed(model, tokenizer, EVAL_TEXTS), want)
            plain_ms, managed_ms = interleaved_ms(plain, model, batch, resident_n)
            managed.remove()
        stop_pool("bench-resident")
        resident_ratio = statistics.median(managed_ms) / statistics.median(plain_ms)
        rows.append(("resident (128 MiB HBM)", plain_ms, managed_ms, resident_ratio, 1.0, 1.0))

        # 2. Half the HBM the model needs, calibrated, veto on.
        started = time.perf_counter()
        calibration = calibrate(
            plain, tokenizer, specs, texts=CALIBRATION_TEXTS[:calibration_texts]
        )
        calibrate_s = time.perf_counter() - started
        hbm = model_bytes // 2
        pool = new_pool("bench-half", f"{storage}/half", hbm, args.quality_budget)
        pool.load_checkpoint(checkpoint, "minilm", calibration=calibration)
        wait_for(lambda: settled(pool), what="placed")
        model, _ = load_minilm(checkpoint)
        with PoolClient(namespace="bench-half") as client:
            managed = manage(model, client, "minilm")
            for _ in range(3):  # the policy learns the layer schedule and places for it
                embed(model, tokenizer, EVAL_TEXTS)
            plain_half, managed_half = interleaved_ms(plain, model, batch, budget_n)
            veto_on = cosines(embed(model, tokenizer, EVAL_TEXTS), want)
            status = pool.status()
            managed.remove()
        stop_pool("bench-half")
        half_ratio = statistics.median(managed_half) / statistics.median(plain_half)

        # 3. Veto off: naive static all-INT4, whatever the floors.
        with held_at(plain, specs, dict.fromkeys((s.block_id for s in specs), Precision.INT4)):
            veto_off = cosines(embed(plain, tokenizer, EVAL_TEXTS), want)
        rows.append(
            (
                f"budget 0.5 ({hbm / MB:.1f} MiB HBM), veto on",
                plain_half,
                managed_half,
                half_ratio,
                float(veto_on.min()),
                float(veto_on.mean()),
            )
        )
        rows.append(
            ("all-INT4, veto off", [], [], None, float(veto_off.min()), float(veto_off.mean()))
        )
    finally:
        for name in ("bench-resident", "bench-half"):
            stop_pool(name)
        ray.shutdown()

    print(
        f"all-MiniLM-L6-v2, {len(specs)} blocks, {model_bytes / MB:.1f} MiB; batch of 8 texts; "
        f"torch threads {args.threads}; emulated HBM; quality budget {args.quality_budget}"
    )
    print()
    print("| case | plain ms (median) | managed ms (median) | ratio | min cosine | mean cosine |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, p_ms, m_ms, ratio, low, mean in rows:
        p = f"{statistics.median(p_ms):.2f}" if p_ms else "-"
        m = f"{statistics.median(m_ms):.2f}" if m_ms else "-"
        r = f"{ratio:.3f}" if ratio is not None else "-"
        print(f"| {name} | {p} | {m} | {r} | {low:.6f} | {mean:.6f} |")
    print()
    print(
        f"resident outputs bit-exact: {bit_exact}; calibration {calibrate_s:.1f} s over "
        f"{calibration_texts} texts; quality cost at the end {status['quality_cost']}; "
        f"states {status['states']}; veto rejections "
        f"{ {k: v for k, v in status['counters'].items() if k.startswith('veto:')} }"
    )
    result.update(
        {
            "resident_ratio": round(resident_ratio, 4),
            "budget_0.5_ratio": round(half_ratio, 4),
            "cosine_veto_on": round(float(veto_on.min()), 6),
            "cosine_veto_off": round(float(veto_off.min()), 6),
            "resident_bit_exact": bit_exact,
            "resident_forwards": len(managed_ms),
            "budget_forwards": len(managed_half),
            "quality_budget": args.quality_budget,
            "hbm_emulated": True,
        }
    )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
