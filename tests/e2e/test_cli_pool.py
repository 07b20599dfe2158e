"""The pool's commands as a user types them: ``weightpool start`` (an embedded local Ray, in the
foreground), then ``load``, ``status`` and ``stop`` from other processes, then Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent / "weightpool"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The command in a new process. Other Ray clusters may run on this machine (tests), so
    the pool is reached by its explicit address, which Ray's token authentication (on by
    default for a local ``ray.init``) wants declared with RAY_AUTH_MODE."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    return subprocess.run(
        [str(BIN), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
        env=env,
    )


@pytest.fixture
def embedded(tmp_path):
    """``weightpool start`` in the foreground; yields its Ray address, then stops it (SIGINT)."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [
            str(BIN),
            "start",
            "--set",
            f"storage_dir={tmp_path / 'store'}",
            "--set",
            "namespace=e2e",
            "--set",
            "hbm_bytes_per_device=128MiB",
            "--admin-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 120
    address = None
    assert proc.stdout is not None
    while address is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"embedded Ray at (\S+):", line)
        address = match.group(1) if match else None
    assert address, "".join(lines)
    yield address, proc, lines
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_start_load_status_stop(embedded, minilm_path) -> None:
    address, proc, lines = embedded
    assert "pool running in namespace 'e2e'" in "".join(lines)

    again = run("start", "--address", address, "--set", "namespace=e2e")  # idempotent
    assert again.returncode == 0, again.stderr
    assert "pool running in namespace 'e2e'" in again.stdout

    loaded = run(
        "load", str(minilm_path), "--model", "minilm", "--address", address, "--namespace", "e2e"
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "minilm loaded into the pool in namespace 'e2e'" in loaded.stdout
    assert "54/54" in loaded.stderr  # the progress bar reached the end

    shown = run("status", "--address", address, "--namespace", "e2e", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout.strip().splitlines()[-1])
    assert status["blocks"] == 54
    kinds = sorted(t["kind"] for t in status["tiers"].values())
    assert kinds == ["hbm", "host", "storage"]
    assert all(t["emulated"] for t in status["tiers"].values() if t["kind"] == "hbm")
    assert list(status["models"]) == ["minilm"]

    table = run("status", "--address", address, "--namespace", "e2e")
    assert re.search(r"\| \S+/hbm0 \| hbm \| \S+ \| 128\.0 \|", table.stdout), table.stdout

    missing = run("status", "--address", address, "--namespace", "nobody")
    assert missing.returncode == 1
    assert "no pool runs in namespace 'nobody'" in missing.stderr

    stopped = run("stop", "--address", address, "--namespace", "e2e")
    assert stopped.returncode == 0, stopped.stderr
    after = run("status", "--address", address, "--namespace", "e2e")
    assert after.returncode == 1 and "no pool runs in namespace 'e2e'" in after.stderr

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0


def test_bad_config_is_refused_with_the_key_named(tmp_path) -> None:
    config = tmp_path / "pool.yaml"
    config.write_text("host_bytes: 1GiB\nhbm_bytes_per_devic: 5\n")
    result = run("start", "--config", str(config))
    assert result.returncode == 1
    assert "hbm_bytes_per_devic=5: Extra inputs are not permitted" in result.stderr


def test_example_config_loads() -> None:
    from actors.config import load_config

    config = load_config(ROOT / "examples" / "pool.yaml")
    assert config.hbm_bytes_per_device == 64 << 20
    assert config.host_bytes == 1 << 30
    assert config.encodings == ("full", "int8", "int4")
