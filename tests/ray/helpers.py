"""Shared helpers of the Ray tests: a pool per test module, waiting on the controller."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from safetensors.torch import load_file

from actors.client import PoolClient
from actors.config import PoolConfig
from actors.pool import Pool, start_pool, stop_pool


def make_pool(namespace: str, storage: Path, **overrides: Any) -> Pool:
    config = PoolConfig(namespace=namespace, storage_dir=str(storage), **overrides)
    return start_pool(config)


def reads_back_on(
    pool: Pool, namespace: str, device: str, expected: dict[str, torch.Tensor]
) -> None:
    """Each block of ``expected`` (block id -> its ``weight`` tensor) is leased on ``device`` and
    reads back bit-exact; then, the controller settled, the registry matches the tiers."""
    with PoolClient(namespace=namespace, device=device) as client:
        for block, tensor in expected.items():
            got = client.get(block)
            assert client.lease_of(block).tier_id == device
            assert torch.equal(got["weight"], tensor), block
    wait_until(lambda: settled(pool), what="settled")
    assert ray.get(pool.controller.consistency.remote()) == []


def wait_until(check: Callable[[], bool], timeout_s: float = 60.0, what: str = "") -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def settled(pool: Pool) -> bool:
    """The controller has nothing queued or running."""
    return bool(ray.get(pool.controller.idle.remote()))


def reference_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under a module path, by their names within the block."""
    return {
        k[len(prefix) + 1 :]: v
        for k, v in load_file(str(path)).items()
        if k.startswith(prefix + ".")
    }


def teardown(namespace: str) -> None:
    stop_pool(namespace)
