"""Movement without a cluster: a memory tier's reservations, and the GPU check's skip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actors.registry import CopyEntry, CopyStatus
from actors.tier_backends import MemoryBackend
from pool.encoding import FULL, Encoding
from pool.errors import CapacityError
from pool.tiers import TierKind, TierSpec

INT8 = Encoding.parse("int8")


def entry(block_id: str, nbytes: int, encoding: Encoding = FULL) -> CopyEntry:
    return CopyEntry(block_id, "t/hbm0", encoding, CopyStatus.READY, 1, nbytes, "c")


def backend(capacity: int) -> MemoryBackend:
    spec = TierSpec(
        tier_id="t/hbm0", kind=TierKind.HBM, capacity_bytes=capacity, node="n", device=0
    )
    return MemoryBackend(spec)


def test_reservations_count_against_capacity_until_committed_or_cancelled():
    tier = backend(100)
    tier.reserve("a", FULL, 60)
    with pytest.raises(CapacityError, match="needs 50 bytes; tier holds 0 and expects 60 of 100"):
        tier.reserve("b", FULL, 50)
    with pytest.raises(CapacityError, match="already arriving"):
        tier.reserve("a", FULL, 10)
    tier.commit("ref-a", entry("a", 60))
    assert (tier.used_bytes(), tier.reserved) == (60, {})
    tier.reserve("b", INT8, 40)
    tier.cancel("b", INT8)
    assert (tier.used_bytes(), tier.reserved, len(tier.inventory())) == (60, {}, 1)
    tier.reserve("a", FULL, 90)  # replaces the held 60 bytes: fits
    tier.commit("ref-a2", entry("a", 90))
    assert tier.used_bytes() == 90 and tier.handle("a", FULL) == "ref-a2"


def test_a_commit_must_match_its_reservation():
    tier = backend(100)
    with pytest.raises(CapacityError, match="were not reserved"):
        tier.commit("ref", entry("a", 10))
    tier.reserve("a", FULL, 10)
    with pytest.raises(CapacityError, match="were not reserved"):
        tier.commit("ref", entry("a", 11))
    assert tier.used_bytes() == 0 and tier.inventory() == []
    assert tier.reserved == {("a", FULL): 10}  # unchanged by the refused commit


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the check runs for real")
def test_the_gpu_check_skips_cleanly_without_cuda():
    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "skipped: no CUDA"
    assert json.loads(lines[-1]) == {"bench": "gpu_check", "skipped": "no CUDA"}
