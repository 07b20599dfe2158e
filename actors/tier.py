"""Tier actors: one Ray actor owns each tier instance's bytes (DESIGN section 3).

Backends (:mod:`actors.tier_backends`): the node's Ray object store for HOST, CXL and emulated
HBM, the checksummed Arrow files for STORAGE, device memory for HBM where CUDA is available
(:mod:`actors.tier_device`).

Movement is pull-based: the destination's :meth:`TierActor.receive` gets a reference from the
source's :meth:`TierActor.export` and reads it (within a node, a zero-copy view of the source's
object; across nodes, Ray's transfer of it), reserves its bytes, and copies it into its own object
while a second thread computes the checksum of the same bytes; the copy is kept only if the
checksum matches. Exact capacity accounting: a copy that does not fit is refused with
:class:`CapacityError` before any byte is copied, nothing changed. Copies through the pool's
collective group (between memory tiers on different nodes) are :class:`actors.peer.PeerEndpoint`'s.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray

from actors.peer import PeerEndpoint
from actors.registry import CopyEntry, CopyStatus
from actors.tier_backends import Backend, MemoryBackend, StorageBackend
from pool.blocks import BlockSpec
from pool.codecs import EncodedBlock, decode_block, encode_block
from pool.encoding import FULL, Encoding, Precision
from pool.errors import CorruptBlockError, UnknownBlockError
from pool.importer import CheckpointSource, SafetensorsSource, StateDictSource, plan_blocks
from pool.regen import RECIPES, LowRankDelta, Tied, regenerate
from pool.store import BlockStore
from pool.tiers import TierKind, TierSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierReport:
    tier_id: str
    kind: str
    node_id: str
    capacity_bytes: int | None
    used_bytes: int
    copies: int
    emulated: bool
    incarnation: str  # new on every (re)start of the actor: a restart empties memory tiers
    shares_copies: bool = False  # a tied block's copy can be its source's (``alias``)


# PERF: below this size the checksum runs inline: handing it to a thread costs more than the
# overlap saves (a 1 MiB copy and its checksum take about 0.2 ms together).
OVERLAP_MIN_BYTES = 4 << 20


def _cpus() -> int:
    """The CPUs this process may run on (all of the machine's where that is not known)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class TierActor(PeerEndpoint):
    """Owns one tier instance. Decides nothing: it stores, serves and drops what it is told.

    Thread-safe (Ray runs it with several concurrent calls): one lock guards the accounting, and
    no copy or checksum runs under it.
    """

    def __init__(
        self,
        spec: TierSpec,
        storage_dir: str | None = None,
        check_tiers: tuple[TierSpec, ...] = (),
    ):
        self.spec_ = spec
        self.node_id = ray.get_runtime_context().get_node_id()
        self.lock = threading.Lock()
        self.incarnation = uuid.uuid4().hex
        self.importing: tuple[str, int, int] | None = None  # (model, blocks done, blocks in all)
        self.checksummer = ThreadPoolExecutor(4, thread_name_prefix="checksum")
        self.backend: Backend = (
            StorageBackend(spec, storage_dir or "weightpool-store", check_tiers)
            if spec.kind is TierKind.STORAGE
            else MemoryBackend(spec)
        )
        self.emulated = spec.emulated
        if spec.kind is TierKind.HBM and not spec.emulated:
            from actors.tier_device import DeviceBackend, cuda_available

            if cuda_available():
                self.backend = DeviceBackend(spec)
            else:  # marked emulated in every report, as it is
                log.warning("tier %s: no CUDA in this actor; HBM emulated", spec.tier_id)
                self.emulated = True

    def ping(self) -> str:
        return self.node_id

    def report(self) -> TierReport:
        with self.lock:
            return TierReport(
                self.spec_.tier_id,
                self.spec_.kind.value,
                self.node_id,
                self.spec_.capacity_bytes,
                self.backend.used_bytes(),
                len(self.backend.inventory()),
                self.emulated,
                self.incarnation,
                bool(getattr(self.backend, "shares_copies", False)),
            )

    def inventory(self) -> list[CopyEntry]:
        with self.lock:
            return list(self.backend.inventory())

    def export(self, spec: BlockSpec, have: Encoding, want: Encoding) -> list[Any]:
        """A reference to the block at ``want``, transcoded from the held ``have`` copy if they
        differ (the source encodes, so the link carries the smaller bytes)."""
        with self.lock:
            if have == want:
                return [self.backend.handle(spec.block_id, have)]
            held = self.backend.read(spec.block_id, have)
        return [ray.put(encode_block(spec, decode_block(spec, held), want))]

    def receive(
        self, block_id: str, encoding: Encoding, source: list[Any], epoch: int, checksum: str
    ) -> tuple[CopyEntry, list[Any]]:
        """Pull the copy from ``source`` (an ``export`` result), verify, and hold it. Returns
        the copy's record and a reference to its bytes (for leases).

        Raises:
            CorruptBlockError: the bytes do not match ``checksum`` (when given); nothing stored.
            CapacityError: the copy does not fit; nothing stored, nothing copied.
        """
        encoded: EncodedBlock = ray.get(source[0])  # a view here; across nodes, Ray's transfer
        return self.keep(block_id, encoding, encoded, epoch, checksum)

    def keep(
        self, block_id: str, encoding: Encoding, encoded: EncodedBlock, epoch: int, checksum: str
    ) -> tuple[CopyEntry, list[Any]]:
        """Hold ``encoded`` as this tier's copy if its checksum is ``checksum`` (any, when empty):
        reserve, copy into an object owned by this actor while the checksum is computed on
        another thread, then commit, or cancel and raise (as :meth:`receive`)."""
        return self._keep(block_id, encoding, encoded, epoch, checksum, "")

    def _keep(
        self,
        block_id: str,
        encoding: Encoding,
        encoded: EncodedBlock,
        epoch: int,
        checksum: str,
        content: str,
    ) -> tuple[CopyEntry, list[Any]]:
        """:meth:`keep`; ``content``, when not empty, is the checksum of ``encoded``'s bytes as
        this actor computed it from those very buffers (a peer receive does, while they arrive)."""
        if encoded.block_id != block_id or encoded.encoding != encoding:
            raise CorruptBlockError(
                f"received {encoded.block_id!r}@{encoded.encoding.name}; expected "
                f"{block_id!r}@{encoding.name}"
            )
        with self.lock:
            self.backend.reserve(block_id, encoding, encoded.nbytes)
        try:
            held = None
            if not content and encoded.nbytes >= OVERLAP_MIN_BYTES and _cpus() > 1:
                # PERF: the checksum and the copy (Ray's put: six memcpy threads) read the same
                # (immutable) bytes at once, scheduled by the OS on every CPU this actor may use.
                # Pinning the checksum to one CPU and the copy to the others (as before) left
                # the copy on one CPU, 6.7 GB/s against 11 on two, and on a CPU another process
                # may be busy on. 256 MiB on the 2-core machine of 2026-11-27, 10 interleaved
                # rounds each, median: pinned 42.4 / 41.2 ms, free 38.6 / 37.8; beside a
                # busy-loop process, pinned 105.4 / 103.7, free 64.8 / 64.9. ``bench/movement.py
                # --quick``, three alternating runs each: intra-node 0.487, 0.519, 0.501 x memcpy
                # pinned, 0.510, 0.575, 0.537 free. (On the machine of an earlier session, under
                # load, pinning measured better: 83.7 against 104.8 ms.)
                pending = self.checksummer.submit(encoded.content_checksum)
                held = self.backend.materialize(encoded)
                content = pending.result()
            elif not content:
                content = encoded.content_checksum()
            if checksum and content != checksum:
                raise CorruptBlockError(
                    f"copy {block_id!r}@{encoding.name}: checksum {content}, expected {checksum}"
                )
            if held is None:
                held = self.backend.materialize(encoded)
        except BaseException:
            with self.lock:
                self.backend.cancel(block_id, encoding)
            raise
        entry = CopyEntry(
            block_id,
            self.spec_.tier_id,
            encoding,
            CopyStatus.READY,
            epoch,
            encoded.nbytes,
            content,
            time.time(),
        )
        with self.lock:
            self.backend.commit(held, entry)
            return entry, [self.backend.handle(block_id, encoding)]

    def alias(
        self, block_id: str, encoding: Encoding, source_id: str, epoch: int, checksum: str
    ) -> tuple[CopyEntry, list[Any]]:
        """Hold a tied block's copy as the copy of ``source_id`` this tier holds at the same
        encoding: one buffer for both, its bytes counted once (:meth:`receive`'s result).

        Raises:
            UnknownBlockError: no such source copy, or this tier's memory cannot be shared.
            CapacityError: the copy is held or arriving already.
            CorruptBlockError: the source's checksum is not ``checksum`` (when given).
        """
        alias = getattr(self.backend, "alias", None)
        if alias is None or not getattr(self.backend, "shares_copies", False):
            raise UnknownBlockError(f"tier {self.spec_.tier_id!r} does not share copies")
        entry = CopyEntry(
            block_id,
            self.spec_.tier_id,
            encoding,
            CopyStatus.READY,
            epoch,
            created_s=time.time(),
            shared_of=source_id,
        )
        with self.lock:
            ref = alias(source_id, entry)
            if checksum and entry.checksum != checksum:
                self.backend.drop(block_id, encoding)
                raise CorruptBlockError(
                    f"copy {block_id!r}@{encoding.name} shares {source_id!r}'s, whose checksum "
                    f"{entry.checksum} is not the block's {checksum}"
                )
            return entry, [ref]

    def regenerate(
        self,
        spec: BlockSpec,
        recipe: Tied | LowRankDelta,
        inputs: list[BlockSpec],
        encoding: Encoding,
        epoch: int,
        checksum: str,
        *sources: list[Any] | None,
    ) -> tuple[CopyEntry, list[Any]]:
        """Rebuild ``spec``'s block by ``recipe`` from its ``inputs`` at full precision (each
        read from this tier where its source is None, else from the ``export`` result given),
        encode it at ``encoding`` and hold it as :meth:`keep` does (verified against
        ``checksum``). Returns what :meth:`receive` returns."""
        tensors = []
        for input_spec, source in zip(inputs, sources, strict=True):
            if source is None:
                with self.lock:
                    encoded = self.backend.read(input_spec.block_id, FULL)
            else:
                encoded = ray.get(source[0])
            tensors.append(decode_block(input_spec, encoded))
        rebuilt = encode_block(spec, regenerate(recipe, tensors), encoding)
        return self.keep(spec.block_id, encoding, rebuilt, epoch, checksum)

    def handle(self, block_id: str, encoding: Encoding) -> list[Any]:
        with self.lock:
            return [self.backend.handle(block_id, encoding)]

    def ipc_handles(self, block_id: str, encoding: Encoding) -> list[Any]:
        """CUDA IPC handles of a device copy's parts, in order, for a consumer process on this
        node (``fn(*args)`` rebuilds each tensor there).

        Raises:
            UnknownBlockError: no such copy, or this tier holds no device memory.
        """
        ipc = getattr(self.backend, "ipc_handles", None)
        if ipc is None:
            raise UnknownBlockError(f"tier {self.spec_.tier_id!r} holds no device memory")
        with self.lock:
            handles: list[Any] = ipc(block_id, encoding)
            return handles

    def drop(self, block_id: str, encoding: Encoding) -> int:
        with self.lock:
            return self.backend.drop(block_id, encoding)

    # -- storage only ---------------------------------------------------------------------------

    def _store(self) -> BlockStore:
        if not isinstance(self.backend, StorageBackend):
            raise UnknownBlockError(f"tier {self.spec_.tier_id!r} is not a storage tier")
        return self.backend.store_

    def import_checkpoint(
        self, path: str, model: str, encodings: tuple[Encoding, ...] = (FULL,)
    ) -> list[BlockSpec]:
        """Import a safetensors checkpoint (file or directory) as ``model``; its specs."""
        return self._import(SafetensorsSource(path), model, encodings)

    def import_state_dict(
        self, state_dict: dict[str, Any], model: str, encodings: tuple[Encoding, ...] = (FULL,)
    ) -> list[BlockSpec]:
        """Import a state dict (names to tensors) as ``model``; its specs."""
        return self._import(StateDictSource(state_dict), model, encodings)

    def _import(
        self, source: CheckpointSource, model: str, encodings: tuple[Encoding, ...]
    ) -> list[BlockSpec]:
        store = self._store()
        total = len(plan_blocks(source, model))
        done = 0

        def progress(_spec: BlockSpec) -> None:
            nonlocal done
            done += 1
            self.importing = (model, done, total)

        with self.lock:
            self.importing = (model, 0, total)
            try:
                return list(
                    store.import_checkpoint(source, model, encodings, progress=progress).specs
                )
            finally:
                self.importing = None

    def import_progress(self) -> tuple[str, int, int] | None:
        """The import under way: (model, blocks written, blocks in all); None when idle. Takes
        no lock, so it answers while an import runs."""
        return self.importing

    def specs(self) -> list[BlockSpec]:
        with self.lock:
            return self._store().specs()

    def update_quality(
        self, updates: dict[str, tuple[dict[Precision, float], Precision]]
    ) -> list[BlockSpec]:
        """Set blocks' sensitivities and floors in the catalog, all or none (see
        ``BlockStore.update_quality``); their new specs, in the order of ``updates``."""
        with self.lock:
            store = self._store()
            store.update_quality(updates)
            return [store.spec(block_id) for block_id in updates]

    def verify(self) -> list[str]:
        with self.lock:
            problems = self._store().verify()
        return [f"{c.block_id}@{c.encoding.name}: {c.reason}" for c in problems]

    def load_recipes(self) -> dict[str, Tied | LowRankDelta]:
        """The pool's regenerators (block id -> recipe), kept beside the catalog."""
        path = self._store().root / "pool-recipes.json"
        return RECIPES.validate_json(path.read_bytes()) if path.exists() else {}

    def save_recipes(self, recipes: dict[str, Tied | LowRankDelta]) -> None:
        path = self._store().root / "pool-recipes.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(RECIPES.dump_json(recipes))
        tmp.replace(path)

    def load_meta(self) -> dict[str, str]:
        """The pool's placement metadata (model -> home HBM tier), kept beside the catalog."""
        path = self._store().root / "pool-meta.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def save_meta(self, meta: dict[str, str]) -> None:
        path = self._store().root / "pool-meta.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, sort_keys=True))
        tmp.replace(path)
