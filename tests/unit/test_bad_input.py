"""Bad input gets a clear error naming the thing and the expected value; nothing changes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pool.blocks import BlockSpec, TensorSpec
from pool.catalog import spec_to_json
from pool.encoding import FULL, Encoding, Precision
from pool.errors import (
    CapacityError,
    CheckpointError,
    DuplicateBlockError,
    SpecError,
    TensorMismatchError,
    UnknownBlockError,
)
from pool.importer import SafetensorsSource, StateDictSource, TensorInfo
from pool.store import BlockStore
from pool.tiers import TierKind, TierSpec


def snapshot(store: BlockStore) -> tuple:
    """Everything an operator could observe of a store: specs, copies and files on disk."""
    files = sorted(
        str(p.relative_to(store.root))
        for p in store.root.rglob("*")
        if p.is_file() and "catalog" not in p.name
    )
    return (
        [spec_to_json(s) for s in store.specs()],
        store.copies(),
        files,
    )


@pytest.fixture
def store(tmp_path):
    with BlockStore(tmp_path / "store") as s:
        s.import_checkpoint(StateDictSource({"enc.layers.0.fc.weight": torch.randn(16, 8)}), "base")
        yield s


def test_truncated_safetensors_is_refused_before_anything_is_written(
    store, tmp_path, minilm_path
) -> None:
    before = snapshot(store)
    cut = tmp_path / "cut.safetensors"
    data = minilm_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError,
        match=r"cut.safetensors: tensor '.*' ends at data byte \d+ but the data section has \d+ bytes \(file truncated\?\)",
    ):
        store.import_checkpoint(SafetensorsSource(cut), "minilm")
    cut.write_bytes(data[:5])
    with pytest.raises(
        CheckpointError,
        match="file is 5 bytes; a safetensors file starts with an 8-byte header length",
    ):
        SafetensorsSource(cut)
    cut.write_bytes(data[:100])
    with pytest.raises(
        CheckpointError, match=r"header length field says \d+ bytes but only 92 follow"
    ):
        SafetensorsSource(cut)
    assert snapshot(store) == before


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"{not json", r"header is not valid JSON"),
        (b"[1, 2]", r"header is a JSON list; expected an object"),
        (
            json.dumps(
                {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "x": 3}
            ).encode(),
            r"tensor 'x' header entry is 3",
        ),
        (
            json.dumps({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}).encode(),
            r"tensor 'w' has dtype 'Q7'; expected one of",
        ),
        (
            json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(),
            r"tensor 'w' spans 8 bytes; expected 12 for shape \[3\] of float32",
        ),
        (
            json.dumps({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}).encode(),
            r"tensor 'w' has shape \[-2\]",
        ),
        (
            json.dumps(
                {"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}
            ).encode(),
            r"tensor 'w' has shape \[true, 2\]|tensor 'w' has shape \[True, 2\]",
        ),
        (
            json.dumps(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                }
            ).encode(),
            r"tensor 'b' starts at data byte 4, which overlaps 'a' \(ending at 8\); expected 8",
        ),
        (
            json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode(),
            r"tensor 'w' starts at data byte 4, which leaves a gap after None \(ending at 0\)",
        ),
    ],
)
def test_malformed_safetensors_headers(tmp_path, header, message) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match=message):
        SafetensorsSource(path)


def test_duplicate_block_ids_are_refused(store) -> None:
    before = snapshot(store)
    with pytest.raises(
        DuplicateBlockError, match=r"block id 'base/enc.layers.0.fc' is already in the catalog"
    ):
        store.import_checkpoint(
            StateDictSource({"enc.layers.0.fc.weight": torch.randn(16, 8)}), "base"
        )
    w = TensorSpec("weight", "a.weight", (2, 2), "float32")
    twice = [BlockSpec("new/a", (w,), 0), BlockSpec("new/a", (w,), 0)]
    with pytest.raises(DuplicateBlockError, match=r"block id 'new/a' appears twice in this batch"):
        store.register(twice)
    assert snapshot(store) == before


def test_a_block_larger_than_any_tier_is_refused(tmp_path) -> None:
    tiers = [
        TierSpec(
            tier_id="n0/hbm0", kind=TierKind.HBM, capacity_bytes=4096, device=0, emulated=True
        ),
        TierSpec(tier_id="n0/host", kind=TierKind.HOST, capacity_bytes=1 << 30),
    ]
    with BlockStore(tmp_path / "s", tiers=tiers) as store:
        source = StateDictSource(
            {"small.weight": torch.randn(8, 8), "big.weight": torch.randn(64, 64)}
        )
        # big at its default floor (int4, group 128): 64 rows x 1 group x (64 + 4) bytes = 4352.
        with pytest.raises(
            CapacityError,
            match=r"block 'm/big' needs 4352 bytes at its floor int4 \(full: 16384\); the largest hbm tier 'n0/hbm0' holds 4096 bytes",
        ):
            store.import_checkpoint(source, "m")
        assert snapshot(store) == ([], [], [])
        # 40x40 float32 fits at int4 (40 x (64 + 4) = 2720 bytes) but not at full (6400 bytes).
        store.import_checkpoint(StateDictSource({"mid.weight": torch.randn(40, 40)}), "m")
        before = snapshot(store)
        with pytest.raises(CapacityError, match=r"'m/mid' needs 6400 bytes at its floor full"):
            store.update_quality({"m/mid": ({}, Precision.FULL)})
        assert snapshot(store) == before


def test_tensors_that_do_not_match_the_spec(store) -> None:
    before = snapshot(store)
    with pytest.raises(
        TensorMismatchError,
        match=r"'base/enc.layers.0.fc', tensor 'weight': dtype bfloat16; expected float32",
    ):
        store.put("base/enc.layers.0.fc", {"weight": torch.zeros(16, 8, dtype=torch.bfloat16)})
    with pytest.raises(
        TensorMismatchError, match=r"tensor 'weight': shape \(8, 16\); expected \(16, 8\)"
    ):
        store.put("base/enc.layers.0.fc", {"weight": torch.zeros(8, 16)}, [Encoding.parse("int8")])
    assert snapshot(store) == before


class LyingSource:
    """A checkpoint whose last tensor's data disagrees with its header."""

    def __init__(self) -> None:
        self.tensors = {f"layers.{i}.fc.weight": torch.randn(8, 8) for i in range(3)}

    def tensor_infos(self):
        return {k: TensorInfo((8, 8), "float32") for k in self.tensors}

    def load(self, name, index=None):
        return self.tensors[name] if name != "layers.2.fc.weight" else torch.randn(8, 9)


def test_a_failed_import_leaves_no_block_and_no_file(store) -> None:
    before = snapshot(store)
    with pytest.raises(
        TensorMismatchError,
        match=r"'lie/layers.2.fc', tensor 'weight': shape \(8, 9\); expected \(8, 8\)",
    ):
        store.import_checkpoint(LyingSource(), "lie", [FULL, Encoding.parse("int4")])
    assert snapshot(store) == before


@pytest.mark.parametrize(("value", "shown"), [(math.nan, "nan"), (-0.25, "-0.25")])
def test_bad_sensitivity_leaves_the_catalog_unchanged(store, value, shown) -> None:
    store.update_quality({"base/enc.layers.0.fc": ({Precision.INT8: 0.01}, Precision.INT8)})
    before = snapshot(store)
    with pytest.raises(
        SpecError,
        match=rf"'base/enc.layers.0.fc': sensitivity at int4 is {shown}; expected a finite number >= 0",
    ):
        store.update_quality({"base/enc.layers.0.fc": ({Precision.INT4: value}, Precision.INT4)})
    assert snapshot(store) == before
    assert store.spec("base/enc.layers.0.fc").sensitivity == {Precision.INT8: 0.01}


def test_unknown_ids_and_copies(store) -> None:
    with pytest.raises(UnknownBlockError, match="'base/missing' is not in the catalog"):
        store.read("base/missing")
    with pytest.raises(
        UnknownBlockError, match=r"'base/enc.layers.0.fc' has no stored copy at int4"
    ):
        store.read("base/enc.layers.0.fc", Encoding.parse("int4"))
    with pytest.raises(UnknownBlockError):
        store.update_quality({"base/missing": ({}, Precision.INT8)})


def test_reduced_copy_needs_the_full_copy_first(tmp_path) -> None:
    with BlockStore(tmp_path / "s") as store:
        spec = BlockSpec("m/a", (TensorSpec("weight", "a.weight", (4, 4), "float32"),), 0)
        store.register([spec])
        with pytest.raises(
            SpecError,
            match=r"'m/a' has no full-precision copy yet; expected 'full' among the encodings \['int8'\]",
        ):
            store.put("m/a", {"weight": torch.zeros(4, 4)}, [Encoding.parse("int8")])
        assert store.copies() == []
