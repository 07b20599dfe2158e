"""The storage tier's content: durable, checksummed block copies under one directory.

``BlockStore`` is the source of truth DESIGN section 5 relies on. Its contract:

- A block is registered (its spec in the catalog) before any copy of it is stored, and its
  full-precision copy is stored before any reduced or compressed one.
- Every change is all-or-nothing: on any error (bad spec, duplicate id, a block no tier can hold,
  tensors that do not match their spec, a failed write) the catalog is as it was, and files
  written for the failed change are removed.
- Every read verifies the file's checksum first; a torn or corrupt file raises
  :class:`CorruptBlockError` and none of its bytes are returned.

Layout: ``<root>/catalog.sqlite`` and ``<root>/blocks/<model>/<module path>@<encoding>.arrow``.
Equal bytes are stored once: a copy whose encoded content and tensors equal a stored copy's
(tied weights, a fine-tuned variant's unchanged blocks, a model imported twice) names that
copy's file (``CopyRecord.stored_as``); a file goes only when no record names it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import torch

from pool.arrowfile import read_verified, write_atomic
from pool.blocks import BlockSpec
from pool.catalog import Catalog, CopyRecord
from pool.codecs import (
    DEFAULT_OPTIONS,
    CodecOptions,
    EncodedBlock,
    check_tensors,
    decode_block,
    encode_block,
    encoded_nbytes,
)
from pool.encoding import FULL, Encoding, Precision
from pool.errors import (
    CapacityError,
    CorruptBlockError,
    DuplicateBlockError,
    SpecError,
    UnknownBlockError,
    WeightpoolError,
)
from pool.importer import DEFAULT_RULE, CheckpointSource, GroupingRule, load_block, plan_blocks
from pool.tiers import TierKind, TierSpec

log = logging.getLogger(__name__)

Layout = tuple[tuple[str, tuple[int, ...], str], ...]  # a block's tensors: name, shape, dtype


def _layout(spec: BlockSpec) -> Layout:
    return tuple((t.name, tuple(t.shape), t.dtype) for t in spec.tensors)


@dataclass(frozen=True)
class CorruptCopy:
    """A stored copy that failed verification, as :meth:`BlockStore.verify` reports it."""

    block_id: str
    encoding: Encoding
    path: str
    reason: str


@dataclass(frozen=True)
class ImportResult:
    model: str
    specs: tuple[BlockSpec, ...]
    copies: tuple[CopyRecord, ...]

    @property
    def full_nbytes(self) -> int:
        return sum(s.full_nbytes for s in self.specs)


def check_fits(
    specs: Iterable[BlockSpec], tiers: Sequence[TierSpec], options: CodecOptions
) -> None:
    """Refuse a block that no configured tier able to serve it can hold.

    A block must fit, at its precision floor (the smallest footprint the guardrail allows), in
    the largest HBM tier, since compute reads it there; with no HBM tier configured, in the
    largest bounded tier. Without tiers there is nothing to check.

    Raises:
        CapacityError: naming the block, its size, its floor and the largest tier.
    """
    hbm = [t for t in tiers if t.kind is TierKind.HBM]
    candidates = hbm or [t for t in tiers if t.capacity_bytes is not None]
    if not candidates:
        return
    largest = max(candidates, key=lambda t: t.capacity_bytes or 0)
    capacity = largest.capacity_bytes or 0
    for spec in specs:
        needed = encoded_nbytes(spec, spec.floor, options)
        if needed > capacity:
            raise CapacityError(
                f"block {spec.block_id!r} needs {needed} bytes at its floor "
                f"{spec.floor.value} (full: {spec.full_nbytes}); the largest "
                f"{largest.kind.value} tier {largest.tier_id!r} holds {capacity} bytes"
            )


class BlockStore:
    """Block specs and their durable copies in a directory (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        tiers: Sequence[TierSpec] = (),
        options: CodecOptions = DEFAULT_OPTIONS,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tiers = tuple(tiers)
        self.options = options
        self.catalog = Catalog(self.root / "catalog.sqlite")

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- registration -------------------------------------------------------------------------

    def check_new(self, specs: Sequence[BlockSpec]) -> None:
        """Everything :meth:`register` checks, without changing anything."""
        seen: set[str] = set()
        for spec in specs:
            if spec.block_id in seen:
                raise DuplicateBlockError(f"block id {spec.block_id!r} appears twice in this batch")
            seen.add(spec.block_id)
        existing = self.catalog.existing_ids(seen)
        if existing:
            raise DuplicateBlockError(
                f"block id {existing[0]!r} is already in the catalog "
                f"({len(existing)} of this batch's ids are)"
            )
        check_fits(specs, self.tiers, self.options)

    def register(self, specs: Sequence[BlockSpec]) -> None:
        """Add block specs, all or none.

        Raises:
            DuplicateBlockError, CapacityError: nothing is registered.
        """
        self.check_new(specs)
        with self.catalog.transaction() as db:
            self.catalog.add_blocks(db, list(specs))

    def update_quality(
        self,
        updates: Mapping[str, tuple[Mapping[Precision, float], Precision]],
    ) -> None:
        """Set sensitivity and floor of several blocks at once, all or none.

        Raises:
            UnknownBlockError, SpecError (a NaN or negative sensitivity): nothing is changed.
        """
        new_specs = [
            dataclasses.replace(self.spec(bid), sensitivity=dict(sens), floor=floor)
            for bid, (sens, floor) in updates.items()
        ]
        check_fits(new_specs, self.tiers, self.options)
        with self.catalog.transaction() as db:
            for spec in new_specs:
                self.catalog.update_spec(db, spec)

    # -- writing copies -----------------------------------------------------------------------

    def _path_for(self, block_id: str, encoding: Encoding, content_checksum: str) -> str:
        # The content checksum in the name keeps a replacement copy from ever overwriting the
        # file the catalog still points to: the old file goes only after the catalog moved on.
        model, _, rest = block_id.partition("/")
        encoding_part = encoding.name.replace("+", "-")
        return (
            f"blocks/{quote(model, safe='._-')}/{quote(rest, safe='._-')}"
            f"@{encoding_part}.{content_checksum[:16]}.arrow"
        )

    def _write(self, encoded: EncodedBlock, content_checksum: str) -> CopyRecord:
        rel = self._path_for(encoded.block_id, encoded.encoding, content_checksum)
        size, checksum = write_atomic(self.root / rel, encoded)
        return CopyRecord(
            encoded.block_id,
            encoded.encoding,
            rel,
            encoded.nbytes,
            size,
            checksum,
            content_checksum,
        )

    def _store(
        self,
        spec: BlockSpec,
        block: EncodedBlock,
        content: str,
        pending: dict[tuple[Encoding, str], list[tuple[CopyRecord, Layout]]],
        written: list[CopyRecord],
    ) -> CopyRecord:
        """The record of ``block``'s copy (``content``: its content checksum). Where a file of
        the same encoded content and the same tensors (names, shapes, dtypes) is stored already
        (by this change, ``pending``, or in the catalog), the record names that file, so equal
        bytes are stored once; else a new file is written (added to ``written``, which a failed
        change removes). Recorded in ``pending``."""
        layout = _layout(spec)
        same = [r for r, lay in pending.get((block.encoding, content), []) if lay == layout]
        if not same:
            same = [
                r
                for r in self.catalog.with_content(block.encoding, content)
                if _layout(self.catalog.spec(r.block_id)) == layout
            ]
        if same:
            other = same[0]
            record = dataclasses.replace(
                other, block_id=spec.block_id, stored_as=other.stored_as or other.block_id
            )
        else:
            record = self._write(block, content)
            written.append(record)
        pending.setdefault((block.encoding, content), []).append((record, layout))
        return record

    def _encode_all(
        self, spec: BlockSpec, tensors: Mapping[str, torch.Tensor], encodings: Sequence[Encoding]
    ) -> list[EncodedBlock]:
        check_tensors(spec, tensors)
        if FULL not in encodings:
            try:
                self.catalog.copy(spec.block_id, FULL)
            except UnknownBlockError:
                raise SpecError(
                    f"block {spec.block_id!r} has no full-precision copy yet; expected 'full' "
                    f"among the encodings {[e.name for e in encodings]} (the full copy is the "
                    "source of truth and is written first)"
                ) from None
        ordered = sorted(set(encodings), key=lambda e: e != FULL)
        return [encode_block(spec, tensors, e, self.options) for e in ordered]

    def _unlink(self, records: Iterable[CopyRecord]) -> None:
        for record in records:
            (self.root / record.path).unlink(missing_ok=True)

    def put(
        self,
        block_id: str,
        tensors: Mapping[str, torch.Tensor],
        encodings: Sequence[Encoding] = (FULL,),
    ) -> list[CopyRecord]:
        """Store copies of a registered block at ``encodings``, all or none.

        A copy whose content is already stored is kept as it is (idempotent). A reduced copy
        with new content replaces the old one: the new file is written and recorded first, and
        the old file removed after. The full copy is never replaced.

        Raises:
            UnknownBlockError: the block is not registered.
            TensorMismatchError: the tensors do not match the spec.
            SpecError: no full copy exists and ``FULL`` is not among ``encodings``, or a full copy
                with other content exists.
        """
        spec = self.spec(block_id)
        encoded = self._encode_all(spec, tensors, encodings)
        existing = {r.encoding: r for r in self.catalog.copies(block_id)}
        kept: list[CopyRecord] = []
        new: list[CopyRecord] = []
        written: list[CopyRecord] = []  # files this change wrote
        try:
            pending: dict[tuple[Encoding, str], list[tuple[CopyRecord, Layout]]] = {}
            for block in encoded:
                content = block.content_checksum()
                old = existing.get(block.encoding)
                if old is not None and old.content_checksum == content:
                    kept.append(old)
                    continue
                if old is not None and block.encoding == FULL:
                    raise SpecError(
                        f"block {block_id!r} already has a full copy with content checksum "
                        f"{old.content_checksum}; the new content has {content} (the source of "
                        "truth is never overwritten; import the new weights under another "
                        "model name)"
                    )
                new.append(self._store(spec, block, content, pending, written))
            with self.catalog.transaction() as db:
                for record in new:
                    self.catalog.put_copy(db, record)
        except BaseException:
            self._unlink(written)
            raise
        self._unlink(  # a replaced file, unless another copy shares it
            existing[r.encoding]
            for r in new
            if r.encoding in existing
            and existing[r.encoding].path != r.path
            and not self.catalog.path_in_use(existing[r.encoding].path)
        )
        return kept + new

    def import_checkpoint(
        self,
        source: CheckpointSource,
        model: str,
        encodings: Sequence[Encoding] = (FULL,),
        rule: GroupingRule = DEFAULT_RULE,
        progress: Callable[[BlockSpec], None] | None = None,
    ) -> ImportResult:
        """Plan, check, encode and store a whole checkpoint as one atomic change.

        ``progress`` is called after each block is written. Nothing is visible in the catalog
        until every block is written; on any error, no block of this import is registered.

        Raises:
            CheckpointError, DuplicateBlockError, CapacityError, TensorMismatchError, SpecError.
        """
        specs = plan_blocks(source, model, rule)
        self.check_new(specs)
        records: list[CopyRecord] = []
        written: list[CopyRecord] = []  # files this import wrote (others' shared)
        pending: dict[tuple[Encoding, str], list[tuple[CopyRecord, Layout]]] = {}
        try:
            for spec in specs:
                tensors = load_block(source, spec)
                check_tensors(spec, tensors)
                for encoding in sorted(set(encodings) | {FULL}, key=lambda e: e != FULL):
                    block = encode_block(spec, tensors, encoding, self.options)
                    content = block.content_checksum()
                    records.append(self._store(spec, block, content, pending, written))
                if progress is not None:
                    progress(spec)
            with self.catalog.transaction() as db:
                self.catalog.add_blocks(db, specs)
                for record in records:
                    self.catalog.put_copy(db, record)
        except BaseException:
            self._unlink(written)
            raise
        return ImportResult(model, tuple(specs), tuple(records))

    # -- reading ------------------------------------------------------------------------------

    def spec(self, block_id: str) -> BlockSpec:
        return self.catalog.spec(block_id)

    def specs(self, model: str | None = None) -> list[BlockSpec]:
        return self.catalog.specs(model)

    def copies(self, block_id: str | None = None) -> list[CopyRecord]:
        return self.catalog.copies(block_id)

    def read(self, block_id: str, encoding: Encoding = FULL) -> EncodedBlock:
        """The stored copy, verified, as zero-copy read-only views of the memory-mapped file.

        The bytes are verified when read. The store never changes a committed file in place
        (writes are atomic renames to new names), so only damage from outside the store can
        change them afterwards; a caller that holds the views for long and needs that guarantee
        re-checks ``content_checksum()`` against the catalog's record before use.

        Raises:
            UnknownBlockError: no such block or copy.
            CorruptBlockError: the file is missing, torn or corrupt (also logged); not served.
        """
        record = self.catalog.copy(block_id, encoding)
        try:
            path, written_as = self.root / record.path, record.stored_as or block_id
            encoded = read_verified(path, record.file_checksum, written_as, encoding)
        except CorruptBlockError as err:
            log.error("%s", err)
            raise
        if record.stored_as:  # another block's file of equal content: the same bytes
            encoded = dataclasses.replace(encoded, block_id=block_id)
        return encoded

    def read_tensors(
        self,
        block_id: str,
        encoding: Encoding = FULL,
        out: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The stored copy at ``encoding``, verified and decoded to the block's dtypes."""
        return decode_block(self.spec(block_id), self.read(block_id, encoding), out)

    def orphans(self) -> list[Path]:
        """Block files no catalog record names: left by a crash between a write and its commit,
        or by a failed removal. Harmless (never read) and safe to delete."""
        known = self.catalog.paths()
        blocks = self.root / "blocks"
        if not blocks.exists():
            return []
        return sorted(
            p
            for p in blocks.rglob("*")
            if p.is_file() and str(p.relative_to(self.root)) not in known
        )

    def verify(self, block_ids: Iterable[str] | None = None) -> list[CorruptCopy]:
        """Check every stored copy (or those of ``block_ids``); return the ones that fail."""
        wanted = None if block_ids is None else set(block_ids)
        problems = []
        for record in self.catalog.copies():
            if wanted is not None and record.block_id not in wanted:
                continue
            try:
                read_verified(
                    self.root / record.path,
                    record.file_checksum,
                    record.stored_as or record.block_id,
                    record.encoding,
                )
            except WeightpoolError as err:
                problems.append(
                    CorruptCopy(record.block_id, record.encoding, record.path, str(err))
                )
        return problems
