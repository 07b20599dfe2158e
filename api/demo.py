"""The main job, as far as it is built: a real model's round trip through the storage tier.

It imports all-MiniLM-L6-v2 into a block store at several encodings, reads every block back
(verified), checks the full-precision copies bit-exact against the checkpoint, measures each
reduced encoding's size and error, then flips one byte of one stored file and shows that the
store refuses to serve it.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pool.encoding import FULL, Encoding
from pool.errors import CorruptBlockError
from pool.importer import SafetensorsSource, load_block
from pool.store import BlockStore

DEMO_ENCODINGS = tuple(Encoding.parse(e) for e in ("full", "fp8", "int8", "int4", "int4+zstd"))


@dataclass(frozen=True)
class EncodingRow:
    encoding: str
    nbytes: int
    size_ratio: float  # nbytes / full-precision nbytes
    median_relative_error: float  # ||x - x_hat|| / ||x|| per quantizable tensor: the median
    max_relative_error: float  # ... and the worst tensor


@dataclass(frozen=True)
class DemoReport:
    model: str
    n_blocks: int
    full_nbytes: int
    import_s: float
    bit_exact: bool
    rows: tuple[EncodingRow, ...]
    corruption_detected: bool
    corruption_message: str


def run_storage_demo(
    checkpoint: Path,
    store_dir: Path | None = None,
    on_block: Callable[[str], None] | None = None,
) -> DemoReport:
    """Run the round trip; ``store_dir`` defaults to a temporary directory removed afterwards."""
    tmp = None if store_dir is not None else Path(tempfile.mkdtemp(prefix="weightpool-demo-"))
    root = store_dir or tmp
    assert root is not None
    try:
        source = SafetensorsSource(checkpoint)
        with BlockStore(root) as store:
            start = time.perf_counter()
            result = store.import_checkpoint(
                source,
                "minilm",
                DEMO_ENCODINGS,
                progress=(lambda spec: on_block(spec.block_id)) if on_block else None,
            )
            import_s = time.perf_counter() - start
            bit_exact = True
            sizes = dict.fromkeys((e.name for e in DEMO_ENCODINGS), 0)
            errors: dict[str, list[float]] = {e.name: [] for e in DEMO_ENCODINGS}
            for spec in result.specs:
                original = load_block(source, spec)
                for encoding in DEMO_ENCODINGS:
                    sizes[encoding.name] += store.read(spec.block_id, encoding).nbytes
                    decoded = store.read_tensors(spec.block_id, encoding)
                    if encoding == FULL:
                        bit_exact &= all(torch.equal(decoded[n], original[n]) for n in spec.names)
                        continue
                    for ts in spec.tensors:
                        if ts.quantizable:
                            x = original[ts.name].double()
                            err = float((decoded[ts.name].double() - x).norm() / x.norm())
                            errors[encoding.name].append(err)
            detected, message = _corrupt_one_byte(store, result.specs[-1].block_id)
        full = sizes[FULL.name]
        rows = tuple(
            EncodingRow(
                name,
                sizes[name],
                sizes[name] / full,
                statistics.median(errors[name] or [0.0]),
                max(errors[name], default=0.0),
            )
            for name in sizes
        )
        return DemoReport(
            "all-MiniLM-L6-v2",
            len(result.specs),
            result.full_nbytes,
            import_s,
            bit_exact,
            rows,
            detected,
            message,
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _corrupt_one_byte(store: BlockStore, block_id: str) -> tuple[bool, str]:
    """Flip one byte in the middle of a block's full copy, try to read it, then restore it."""
    record = store.catalog.copy(block_id, FULL)
    path = store.root / record.path
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    quiet = logging.getLogger("pool.store")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the error below is the expected outcome, not news
    try:
        store.read(block_id)
        return False, "the corrupt file was served"
    except CorruptBlockError as err:
        return True, str(err)
    finally:
        quiet.setLevel(level)
        path.write_bytes(original)
