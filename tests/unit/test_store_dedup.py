"""Equal bytes stored once: tied weights, a variant's unchanged blocks and a model imported twice
name one file; reads, verification, failures and replacements keep every copy's bytes."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from pool.catalog import Catalog
from pool.encoding import FULL, Encoding
from pool.errors import TensorMismatchError
from pool.importer import StateDictSource
from pool.store import BlockStore

INT8 = Encoding.parse("int8")


def files(root) -> list:
    return sorted((root / "blocks").rglob("*.arrow"))


def tied_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    embed = torch.randn(32, 8, generator=generator)
    return {
        "embed.weight": embed,
        "layers.0.fc.weight": torch.randn(8, 8, generator=generator),
        "head.weight": embed,  # tied: the same tensor
        "mirror.weight": embed.reshape(8, 32).clone(),  # the same bytes, another shape
    }


def test_tied_weights_are_stored_once_and_read_as_themselves(tmp_path) -> None:
    state = tied_state()
    with BlockStore(tmp_path) as store:
        store.import_checkpoint(StateDictSource(state), "m", [FULL, INT8])
        head, embed = store.catalog.copy("m/head", FULL), store.catalog.copy("m/embed", FULL)
        assert (embed.stored_as, head.stored_as) == ("", "m/embed")
        assert head.path == embed.path and head.file_checksum == embed.file_checksum
        assert store.catalog.copy("m/head", INT8).stored_as == "m/embed"
        assert store.catalog.copy("m/mirror", FULL).stored_as == ""  # another layout
        assert len(files(tmp_path)) == 3 * 2  # embed, fc, mirror at two encodings
        read = store.read("m/head")
        assert read.block_id == "m/head"
        assert torch.equal(store.read_tensors("m/head")["weight"], state["head.weight"])
        assert torch.equal(store.read_tensors("m/mirror")["weight"], state["mirror.weight"])
        assert store.verify() == [] and store.orphans() == []


def test_a_model_imported_twice_writes_no_second_file(tmp_path) -> None:
    state = tied_state()
    with BlockStore(tmp_path) as store:
        store.import_checkpoint(StateDictSource(state), "a")
        before = files(tmp_path)
        store.import_checkpoint(StateDictSource(state), "b")
        assert files(tmp_path) == before  # nothing under blocks/b
        assert {r.stored_as for r in store.copies() if r.block_id.startswith("b/")} == {
            "a/embed",
            "a/layers.0.fc",
            "a/mirror",
        }
    with BlockStore(tmp_path) as store:  # from disk: every copy reads back as itself
        for key, tensor in state.items():
            block = "b/" + key.rsplit(".", 1)[0]
            assert torch.equal(store.read_tensors(block)["weight"], tensor)
        assert store.verify() == []


def test_a_failed_import_removes_only_the_files_it_wrote(tmp_path) -> None:
    state = tied_state()
    with BlockStore(tmp_path) as store:
        store.import_checkpoint(StateDictSource(state), "a")
        before = files(tmp_path)
        bad = dict(state, **{"extra.weight": torch.randn(3, 3)})

        def fail(spec) -> None:
            if spec.block_id == "b/extra":
                raise TensorMismatchError("stop here")

        with pytest.raises(TensorMismatchError):
            store.import_checkpoint(StateDictSource(bad), "b", progress=fail)
        assert files(tmp_path) == before  # b's new file removed, a's shared files kept
        assert store.specs("b") == [] and store.verify() == []


def test_replacing_a_shared_reduced_copy_keeps_the_file_for_the_other(tmp_path) -> None:
    from pool.codecs import CodecOptions

    weights = {"x.weight": torch.randn(8, 256)}
    int4 = Encoding.parse("int4")
    with BlockStore(tmp_path) as store:
        store.import_checkpoint(StateDictSource(weights), "a", [int4])
        store.import_checkpoint(StateDictSource(weights), "b", [int4])
        shared = store.catalog.copy("b/x", int4)
        assert shared.stored_as == "a/x"
    tensors = {"weight": weights["x.weight"]}
    with BlockStore(tmp_path, options=CodecOptions(int4_group_size=64)) as store:
        new = store.put("b/x", tensors, [FULL, int4])[1]
        assert new.stored_as == "" and new.path != shared.path
        assert (tmp_path / shared.path).exists()  # still a/x's
        assert store.verify() == []
        store.put("a/x", tensors, [FULL, int4])  # a/x takes b/x's new file; its own goes
        assert store.catalog.copy("a/x", int4).stored_as == "b/x"
        assert not (tmp_path / shared.path).exists()
        assert store.verify() == [] and store.orphans() == []


def test_a_version_1_catalog_is_migrated_when_opened(tmp_path) -> None:
    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(str(path))
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE blocks (block_id TEXT PRIMARY KEY, model TEXT NOT NULL,
                             ordinal INTEGER NOT NULL, spec TEXT NOT NULL);
        CREATE TABLE copies (block_id TEXT NOT NULL, encoding TEXT NOT NULL, path TEXT NOT NULL,
                             nbytes INTEGER NOT NULL, file_nbytes INTEGER NOT NULL,
                             file_checksum TEXT NOT NULL, content_checksum TEXT NOT NULL,
                             PRIMARY KEY (block_id, encoding));
        INSERT INTO copies VALUES ('m/x', 'full', 'blocks/m/x@full.arrow', 4, 9, 'f', 'c');
        """
    )
    db.commit()
    db.close()
    catalog = Catalog(path)
    try:
        [record] = catalog.copies()
        assert (record.path, record.content_checksum, record.stored_as) == (
            "blocks/m/x@full.arrow",
            "c",
            "",
        )
        assert catalog.with_content(FULL, "c") == [record]
    finally:
        catalog.close()
    catalog = Catalog(path)  # opened again: version 2 now
    catalog.close()
    version = sqlite3.connect(str(path)).execute("SELECT value FROM meta").fetchone()[0]
    assert version == "2"
