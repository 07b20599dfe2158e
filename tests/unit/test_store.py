"""The storage tier's content on real files: the real model round trip and corruption."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from safetensors.torch import load_file

from pool.encoding import FULL, Encoding
from pool.errors import CorruptBlockError, SpecError, UnknownBlockError
from pool.importer import SafetensorsSource
from pool.store import BlockStore

ENCODINGS = [FULL, Encoding.parse("int8"), Encoding.parse("int4+zstd")]


@pytest.fixture(scope="module")
def minilm_store(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("store")
    with BlockStore(root) as store:
        store.import_checkpoint(SafetensorsSource(minilm_path), "minilm", ENCODINGS)
    return root


def test_real_model_round_trip_is_bit_exact(minilm_store, minilm_path) -> None:
    reference = load_file(str(minilm_path))  # read by safetensors itself, not by weightpool
    with BlockStore(minilm_store) as store:  # a fresh store: everything comes from disk
        specs = store.specs("minilm")
        assert len(specs) == 54
        seen = set()
        for spec in specs:
            tensors = store.read_tensors(spec.block_id)
            for ts in spec.tensors:
                assert tensors[ts.name].dtype == reference[ts.source].dtype
                assert torch.equal(tensors[ts.name], reference[ts.source]), ts.source
                seen.add(ts.source)
        assert seen == set(reference)
        assert len(store.copies()) == 54 * len(ENCODINGS)
        assert store.verify() == []


def test_reads_are_zero_copy_views_of_the_mapped_file(minilm_store) -> None:
    with BlockStore(minilm_store) as store:
        encoded = store.read("minilm/embeddings.word_embeddings")
        part = encoded.tensors[0].parts[0]
        assert part.data.nbytes == 30522 * 384 * 4
        assert not part.data.flags.owndata and not part.data.flags.writeable
        assert part.data.ctypes.data % 8 == 0  # aligned for every dtype up to 8 bytes
        decoded = store.read_tensors("minilm/embeddings.word_embeddings")
        decoded["weight"].mul_(2)  # decoded tensors are private copies, safe to write
        again = store.read_tensors("minilm/embeddings.word_embeddings")
        assert not torch.equal(decoded["weight"], again["weight"])


def _flip_byte(path, offset) -> bytes:
    data = bytearray(path.read_bytes())
    original = bytes(data)
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    return original


@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_one_flipped_byte_is_detected_and_never_served(minilm_store, where) -> None:
    block = "minilm/encoder.layer.2.intermediate.dense"
    with BlockStore(minilm_store) as store:
        record = store.catalog.copy(block, FULL)
        path = minilm_store / record.path
        original = _flip_byte(path, int(where * (path.stat().st_size - 1)))
        try:
            with pytest.raises(
                CorruptBlockError, match=r"intermediate.dense' at full.*checksum"
            ) as info:
                store.read_tensors(block)
            assert record.file_checksum in str(info.value)
            problems = store.verify()
            assert [(p.block_id, p.encoding) for p in problems] == [(block, FULL)]
            # Other copies of the same block are untouched and still served.
            store.read_tensors(block, Encoding.parse("int8"))
        finally:
            path.write_bytes(original)
        assert store.verify([block]) == []


def test_torn_and_missing_files_are_detected(minilm_store) -> None:
    block = "minilm/encoder.layer.4.attention.self.key"
    with BlockStore(minilm_store) as store:
        record = store.catalog.copy(block, Encoding.parse("int4+zstd"))
        path = minilm_store / record.path
        original = path.read_bytes()
        try:
            path.write_bytes(original[: len(original) // 2])
            with pytest.raises(CorruptBlockError, match="not served"):
                store.read(block, record.encoding)
            path.unlink()
            with pytest.raises(CorruptBlockError, match="cannot be opened"):
                store.read(block, record.encoding)
        finally:
            path.write_bytes(original)
        store.read(block, record.encoding)


def test_a_valid_file_under_the_wrong_name_is_refused(minilm_store) -> None:
    with BlockStore(minilm_store) as store:
        a = store.catalog.copy("minilm/encoder.layer.0.attention.self.query", FULL)
        b = store.catalog.copy("minilm/encoder.layer.0.attention.self.key", FULL)
        path_a, path_b = minilm_store / a.path, minilm_store / b.path
        original = path_a.read_bytes()
        path_a.write_bytes(path_b.read_bytes())
        try:
            with pytest.raises(CorruptBlockError):
                store.read(a.block_id)
        finally:
            path_a.write_bytes(original)


def test_put_is_idempotent_and_never_overwrites_the_source_of_truth(tmp_path, minilm_path) -> None:
    source = SafetensorsSource(minilm_path)
    with BlockStore(tmp_path) as store:
        result = store.import_checkpoint(source, "minilm")
        spec = result.specs[5]
        tensors = store.read_tensors(spec.block_id)
        store.put(spec.block_id, tensors, [FULL, Encoding.parse("fp8")])  # same content: fine
        assert {r.encoding.name for r in store.copies(spec.block_id)} == {"full", "fp8"}
        changed = {n: t + 1 for n, t in tensors.items()}
        with pytest.raises(SpecError, match="already has a full copy"):
            store.put(spec.block_id, changed)
        assert torch.equal(store.read_tensors(spec.block_id)["weight"], tensors["weight"])
        with pytest.raises(UnknownBlockError, match="'minilm/nope' is not in the catalog"):
            store.put("minilm/nope", tensors)


def test_no_temporary_files_are_left(minilm_store) -> None:
    leftovers = [p for p in minilm_store.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_int8_copy_is_a_quarter_of_full(minilm_store) -> None:
    with BlockStore(minilm_store) as store:
        full = sum(r.nbytes for r in store.copies() if r.encoding == FULL)
        int8 = sum(r.nbytes for r in store.copies() if r.encoding.name == "int8")
    assert 0.25 < int8 / full < 0.26  # weights at 1 byte, plus scales, biases and norms at 4


def test_replacing_a_reduced_copy_never_leaves_the_catalog_pointing_at_new_bytes(tmp_path) -> None:
    from pool.codecs import CodecOptions
    from pool.importer import StateDictSource

    weights = {"layers.0.fc.weight": torch.randn(8, 256)}
    with BlockStore(tmp_path) as store:
        store.import_checkpoint(StateDictSource(weights), "m", [Encoding.parse("int4")])
        old = store.catalog.copy("m/layers.0.fc", Encoding.parse("int4"))
    tensors = {"weight": weights["layers.0.fc.weight"]}
    # The same store re-encoded with another INT4 group size: new content for the same encoding.
    with BlockStore(tmp_path, options=CodecOptions(int4_group_size=64)) as store:
        new = store.put("m/layers.0.fc", tensors, [FULL, Encoding.parse("int4")])
        assert [r.encoding.name for r in new] == ["full", "int4"]
        assert new[1].path != old.path and new[1].content_checksum != old.content_checksum
        assert not (tmp_path / old.path).exists()  # the replaced file is gone...
        assert store.verify() == []  # ...and every record matches its file
        assert store.read("m/layers.0.fc", Encoding.parse("int4")).tensors[0].parts[0].shape == (
            8,
            4,
            32,
        )
        files = sorted(p.name for p in (tmp_path / "blocks").rglob("*.arrow"))
        assert len(files) == 2


def test_orphan_files_are_reported_not_served(tmp_path) -> None:
    from pool.importer import StateDictSource

    with BlockStore(tmp_path) as store:
        store.import_checkpoint(StateDictSource({"layers.0.fc.weight": torch.randn(4, 4)}), "m")
        assert store.orphans() == []
        stray = tmp_path / "blocks" / "m" / "layers.0.fc@full.0123456789abcdef.arrow"
        stray.write_bytes(b"left by a crash")
        assert store.orphans() == [stray]
        assert store.verify() == []


def test_a_failed_commit_leaves_the_catalog_usable(tmp_path) -> None:
    from pool.catalog import CopyRecord

    with BlockStore(tmp_path) as store:
        bad = CopyRecord("m/none", FULL, "x", 1, 1, "c", "c")
        with pytest.raises(sqlite3.OperationalError), store.catalog.transaction() as db:
            store.catalog.put_copy(db, bad)
            db.execute("INSERT INTO nonexistent VALUES (1)")
        with store.catalog.transaction() as db:  # a new transaction starts fine
            pass
        assert store.copies() == []
