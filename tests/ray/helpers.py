"""Shared helpers of the Ray tests: a pool per test module, waiting on the controller."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from safetensors.torch import load_file

from actors.config import PoolConfig
from actors.pool import Pool, start_pool, stop_pool


def make_pool(namespace: str, storage: Path, **overrides: Any) -> Pool:
    config = PoolConfig(namespace=namespace, storage_dir=str(storage), **overrides)
    return start_pool(config)


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
