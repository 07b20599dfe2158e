"""The ``weightpool`` command, run as a user runs it (click's runner, real files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from api.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_load_then_verify_then_detect_corruption(tmp_path, minilm_path) -> None:
    runner = CliRunner()
    store = tmp_path / "store"
    result = runner.invoke(
        main,
        [
            "load",
            str(minilm_path),
            "--model",
            "minilm",
            "--store",
            str(store),
            "--encodings",
            "int8,int4+zstd",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "imported 54 blocks (86.6 MiB at full precision) as 162 copies" in result.output
    result = runner.invoke(main, ["verify", "--store", str(store)])
    assert result.exit_code == 0 and "162 of 162 copies verified" in result.output
    victim = next((store / "blocks" / "minilm").glob("encoder.layer.1.output.dense@int8.*.arrow"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = runner.invoke(main, ["verify", "--store", str(store)])
    assert result.exit_code == 1
    assert "CORRUPT minilm/encoder.layer.1.output.dense @ int8" in result.output
    assert "161 of 162 copies verified" in result.output


def test_load_refuses_bad_input_and_imports_nothing(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{oops")
    runner = CliRunner()
    result = runner.invoke(main, ["load", str(bad), "--model", "m", "--store", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "header length field says 16 bytes but only 5 follow" in result.output
    assert "(nothing was imported)" in result.output
    result = runner.invoke(main, ["load", str(bad), "--model", "m", "--encodings", "int3"])
    assert result.exit_code == 2 and "encoding 'int3' is not valid" in result.output


def test_demo_round_trips_the_real_model() -> None:
    result = CliRunner().invoke(main, ["demo", "--storage-only"])
    assert result.exit_code == 0, result.output
    assert "all-MiniLM-L6-v2: 54 blocks, 86.6 MiB" in result.output
    assert "full-precision copies bit-exact to the checkpoint: True" in result.output
    assert "one flipped byte detected: True" in result.output
    assert "| int4+zstd |" in result.output


def test_codec_benchmark_prints_its_json_line() -> None:
    """The benchmark runs end to end on a slice of the model (its figures are not tested)."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "codecs.py"),
            "--mib",
            "1",
            "--repeats",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["bench"] == "codecs" and summary["memcpy_gbps"] > 0
    assert 1 <= summary["weights_mib"] < 80  # a slice, not the whole 86.6 MiB model
    assert set(summary["codecs"]) == {"fp8", "int8", "int4", "zstd", "lz4"}
    for figures in summary["codecs"].values():
        assert set(figures) == {"encode_gbps", "decode_gbps", "size_ratio"}
    assert summary["codecs"]["int4"]["size_ratio"] < summary["codecs"]["int8"]["size_ratio"] < 1


def test_bench_refuses_an_unknown_benchmark_by_name(tmp_path) -> None:
    result = CliRunner().invoke(main, ["bench", "--only", "codecs,nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "['nope']; expected some of codecs, policy_scale, trace_replay" in result.output
    assert not (tmp_path / "report.md").exists()
