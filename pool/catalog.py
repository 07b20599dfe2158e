"""The storage catalog: block specs, and for each stored copy its file, encoding and checksums.

SQLite (the standard library's, so no service to run) gives the catalog atomic multi-row
changes: an import, a quality update or a batch of copies lands whole or not at all. The catalog
is owned by one storage tier actor at a time (one owner per resource); it is not meant to be
shared between processes on a network filesystem.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pool.blocks import BlockKind, BlockSpec, TensorSpec
from pool.encoding import Encoding, Precision
from pool.errors import DuplicateBlockError, UnknownBlockError

SCHEMA_VERSION = "2"  # 2: copies.stored_as (version 1 catalogs are migrated when opened)
_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    block_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    spec TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS blocks_model ON blocks (model, ordinal);
CREATE TABLE IF NOT EXISTS copies (
    block_id TEXT NOT NULL REFERENCES blocks (block_id),
    encoding TEXT NOT NULL,
    path TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    file_nbytes INTEGER NOT NULL,
    file_checksum TEXT NOT NULL,
    content_checksum TEXT NOT NULL,
    stored_as TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (block_id, encoding)
);
CREATE INDEX IF NOT EXISTS copies_content ON copies (content_checksum);
"""
_MIGRATE_1 = "ALTER TABLE copies ADD COLUMN stored_as TEXT NOT NULL DEFAULT ''"


@dataclass(frozen=True)
class CopyRecord:
    """A stored copy. ``path`` is relative to the store's root; ``nbytes`` counts the encoded
    parts (what the copy costs in a tier), ``file_nbytes`` the whole file with its framing.
    ``stored_as`` names the block the file was written for when it is another block's (equal
    content and layout: tied weights, a fine-tuned variant's unchanged blocks); the file says
    that block's id, and reads relabel it."""

    block_id: str
    encoding: Encoding
    path: str
    nbytes: int
    file_nbytes: int
    file_checksum: str
    content_checksum: str
    stored_as: str = ""


def spec_to_json(spec: BlockSpec) -> str:
    return json.dumps(
        {
            "block_id": spec.block_id,
            "tensors": [
                {
                    "name": t.name,
                    "source": t.source,
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "source_index": t.source_index,
                }
                for t in spec.tensors
            ],
            "layer": spec.layer,
            "kind": spec.kind.value,
            "expert": spec.expert,
            "sensitivity": {p.value: v for p, v in spec.sensitivity.items()},
            "floor": spec.floor.value,
        }
    )


def spec_from_json(text: str) -> BlockSpec:
    raw = json.loads(text)
    return BlockSpec(
        block_id=raw["block_id"],
        tensors=tuple(
            TensorSpec(t["name"], t["source"], tuple(t["shape"]), t["dtype"], t["source_index"])
            for t in raw["tensors"]
        ),
        layer=raw["layer"],
        kind=BlockKind(raw["kind"]),
        expert=raw["expert"],
        sensitivity={Precision(k): v for k, v in raw["sensitivity"].items()},
        floor=Precision(raw["floor"]),
    )


class Catalog:
    """Block specs and stored copies, in one SQLite file.

    One connection, usable from any thread but not from two at once: a caller with concurrent
    threads (the storage tier actor) serializes its calls.
    """

    def __init__(self, path: Path):
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_DDL)  # a version 1 table stays as it was: migrated below
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is not None and row[0] == "1":
            with self.transaction() as db:
                db.execute(_MIGRATE_1)
                db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION,))
            row = (SCHEMA_VERSION,)
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise RuntimeError(
                f"catalog {path} has schema version {row[0]}; "
                f"this weightpool reads {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All changes inside land together, or none do if the block raises."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def existing_ids(self, block_ids: Iterable[str]) -> list[str]:
        ids = list(block_ids)
        found: list[str] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT block_id FROM blocks WHERE block_id IN ({marks})", chunk
            ).fetchall()
            found.extend(r[0] for r in rows)
        return found

    def add_blocks(self, db: sqlite3.Connection, specs: list[BlockSpec]) -> None:
        """Insert specs inside a :meth:`transaction` (the caller checked for duplicates)."""
        start = db.execute("SELECT COALESCE(MAX(ordinal), -1) + 1 FROM blocks").fetchone()[0]
        try:
            db.executemany(
                "INSERT INTO blocks VALUES (?, ?, ?, ?)",
                [(s.block_id, s.model, start + i, spec_to_json(s)) for i, s in enumerate(specs)],
            )
        except sqlite3.IntegrityError as err:
            raise DuplicateBlockError(f"a block id is already in the catalog ({err})") from None

    def update_spec(self, db: sqlite3.Connection, spec: BlockSpec) -> None:
        db.execute("UPDATE blocks SET spec=? WHERE block_id=?", (spec_to_json(spec), spec.block_id))

    def put_copy(self, db: sqlite3.Connection, record: CopyRecord) -> None:
        db.execute(
            "INSERT OR REPLACE INTO copies VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.block_id,
                record.encoding.name,
                record.path,
                record.nbytes,
                record.file_nbytes,
                record.file_checksum,
                record.content_checksum,
                record.stored_as,
            ),
        )

    def spec(self, block_id: str) -> BlockSpec:
        row = self._db.execute("SELECT spec FROM blocks WHERE block_id=?", (block_id,)).fetchone()
        if row is None:
            raise UnknownBlockError(f"block {block_id!r} is not in the catalog")
        return spec_from_json(row[0])

    def specs(self, model: str | None = None) -> list[BlockSpec]:
        """Specs in registration order, optionally of one model."""
        if model is None:
            rows = self._db.execute("SELECT spec FROM blocks ORDER BY ordinal").fetchall()
        else:
            rows = self._db.execute(
                "SELECT spec FROM blocks WHERE model=? ORDER BY ordinal", (model,)
            ).fetchall()
        return [spec_from_json(r[0]) for r in rows]

    def copies(self, block_id: str | None = None) -> list[CopyRecord]:
        if block_id is None:
            rows = self._db.execute("SELECT * FROM copies ORDER BY block_id, encoding").fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM copies WHERE block_id=? ORDER BY encoding", (block_id,)
            ).fetchall()
        return [_record(r) for r in rows]

    def with_content(self, encoding: Encoding, content_checksum: str) -> list[CopyRecord]:
        """The copies at ``encoding`` whose encoded content has this checksum."""
        rows = self._db.execute(
            "SELECT * FROM copies WHERE content_checksum=? AND encoding=? ORDER BY block_id",
            (content_checksum, encoding.name),
        ).fetchall()
        return [_record(r) for r in rows]

    def paths(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT path FROM copies").fetchall()}

    def path_in_use(self, path: str) -> bool:
        """Whether any copy's record names the file ``path``."""
        return self._db.execute("SELECT 1 FROM copies WHERE path=?", (path,)).fetchone() is not None

    def copy(self, block_id: str, encoding: Encoding) -> CopyRecord:
        for record in self.copies(block_id):
            if record.encoding == encoding:
                return record
        self.spec(block_id)  # raises for an unknown block
        raise UnknownBlockError(f"block {block_id!r} has no stored copy at {encoding.name}")


def _record(row: tuple[Any, ...]) -> CopyRecord:
    return CopyRecord(row[0], Encoding.parse(row[1]), *row[2:8])
