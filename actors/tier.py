"""Tier actors: one Ray actor owns each tier instance's bytes (DESIGN section 3).

Two backends behind one small protocol:

- :class:`MemoryBackend` for HOST, CXL and CPU-emulated HBM: each copy is one object in the Ray
  object store of the actor's node, put (and so owned) by the actor. A consumer on the same node
  maps it without copying; another node's consumer gets it by Ray's object transfer. If the actor
  dies, Ray frees the objects it owns: its copies are gone, exactly as the failure model says.
  Ray's object store is pre-allocated shared memory, so copies need no allocation of their own.
- :class:`StorageBackend` for STORAGE: the checksummed Arrow files of a ``pool.store.BlockStore``.

Movement is pull-based: the destination's :meth:`TierActor.receive` gets a reference from the
source's :meth:`TierActor.export` and reads it (within a node, a zero-copy view of the source's
object; across nodes, Ray's transfer of it), reserves its bytes, and copies it into its own object
while a second thread computes the checksum of the same bytes; the copy is kept only if the
checksum matches. Exact capacity accounting: a copy that does not fit is refused with
:class:`CapacityError` before any byte is copied, nothing changed. Peer copies between HBM tiers
by a collective group are :class:`actors.peer.PeerEndpoint`'s.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import ray

from actors.peer import PeerEndpoint
from actors.registry import CopyEntry, CopyStatus
from pool.blocks import BlockSpec
from pool.codecs import EncodedBlock, decode_block, encode_block
from pool.encoding import FULL, Encoding, Precision
from pool.errors import CapacityError, CorruptBlockError, UnknownBlockError, WeightpoolError
from pool.importer import CheckpointSource, SafetensorsSource, StateDictSource, plan_blocks
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


@dataclass
class _Held:
    ref: Any  # ObjectRef, owned by this actor
    entry: CopyEntry


class Backend(Protocol):
    def reserve(self, block_id: str, encoding: Encoding, nbytes: int) -> None: ...
    def materialize(self, encoded: EncodedBlock) -> Any: ...
    def commit(self, held: Any, entry: CopyEntry) -> None: ...
    def cancel(self, block_id: str, encoding: Encoding) -> None: ...
    def read(self, block_id: str, encoding: Encoding) -> EncodedBlock: ...
    def handle(self, block_id: str, encoding: Encoding) -> Any: ...
    def drop(self, block_id: str, encoding: Encoding) -> int: ...
    def inventory(self) -> list[CopyEntry]: ...
    def used_bytes(self) -> int: ...


class MemoryBackend:
    """Copies as owned objects in the node's object store, with exact byte accounting.

    A copy arrives in steps: :meth:`reserve` its bytes under the actor's lock (refused with
    :class:`CapacityError` if held and reserved bytes would pass the capacity; a copy held under
    the same key counts as freed, since it is replaced); :meth:`materialize` it (the copy, outside
    the lock); then, under the lock, :meth:`commit` it once verified or :meth:`cancel` the
    reservation. Only committed copies are used, served and inventoried; one reservation per key
    at a time.
    """

    def __init__(self, spec: TierSpec):
        self.capacity = spec.capacity_bytes or 0
        self.held: dict[tuple[str, Encoding], _Held] = {}
        self.reserved: dict[tuple[str, Encoding], int] = {}
        self.used = 0

    def reserve(self, block_id: str, encoding: Encoding, nbytes: int) -> None:
        key = (block_id, encoding)
        if key in self.reserved:
            raise CapacityError(f"copy {block_id!r}@{encoding.name} is already arriving")
        old = self.held.get(key)
        freed = old.entry.nbytes if old else 0
        pending = sum(self.reserved.values())
        if self.used + pending - freed + nbytes > self.capacity:
            raise CapacityError(
                f"copy {block_id!r}@{encoding.name} needs {nbytes} bytes; tier holds "
                f"{self.used} and expects {pending} of {self.capacity}"
            )
        self.reserved[key] = nbytes

    def materialize(self, encoded: EncodedBlock) -> Any:
        """This tier's own copy of ``encoded``: an object in the node's store, owned by this
        actor (the one copy of a move)."""
        return ray.put(encoded)

    def commit(self, held: Any, entry: CopyEntry) -> None:
        key = (entry.block_id, entry.encoding)
        if self.reserved.get(key) != entry.nbytes:
            raise CapacityError(
                f"copy {entry.block_id!r}@{entry.encoding.name}: {entry.nbytes} bytes were not "
                "reserved"
            )
        del self.reserved[key]
        old = self.held.get(key)
        self.held[key] = _Held(held, entry)
        self.used += entry.nbytes - (old.entry.nbytes if old else 0)

    def cancel(self, block_id: str, encoding: Encoding) -> None:
        self.reserved.pop((block_id, encoding), None)

    def handle(self, block_id: str, encoding: Encoding) -> Any:
        held = self.held.get((block_id, encoding))
        if held is None:
            raise UnknownBlockError(f"no copy {block_id!r}@{encoding.name} on this tier")
        return held.ref

    def read(self, block_id: str, encoding: Encoding) -> EncodedBlock:
        encoded: EncodedBlock = ray.get(self.handle(block_id, encoding))  # a zero-copy view
        return encoded

    def drop(self, block_id: str, encoding: Encoding) -> int:
        held = self.held.pop((block_id, encoding), None)
        if held is None:
            return 0
        self.used -= held.entry.nbytes
        return held.entry.nbytes

    def inventory(self) -> list[CopyEntry]:
        return [h.entry for h in self.held.values()]

    def used_bytes(self) -> int:
        return self.used


class StorageBackend:
    """The durable tier: a :class:`BlockStore` directory. Reads are verified by the store."""

    def __init__(self, spec: TierSpec, root: str, check_tiers: tuple[TierSpec, ...] = ()):
        self.tier_id = spec.tier_id
        self.store_ = BlockStore(root, check_tiers)  # imports refuse blocks no HBM tier holds

    def reserve(self, block_id: str, encoding: Encoding, nbytes: int) -> None:
        raise WeightpoolError(
            f"storage tier {self.tier_id!r} is written by import only, not by transfers"
        )

    def materialize(self, encoded: EncodedBlock) -> Any:
        self.reserve(encoded.block_id, encoded.encoding, encoded.nbytes)

    def commit(self, held: Any, entry: CopyEntry) -> None:
        self.reserve(entry.block_id, entry.encoding, entry.nbytes)

    def cancel(self, block_id: str, encoding: Encoding) -> None:
        pass

    def read(self, block_id: str, encoding: Encoding) -> EncodedBlock:
        return self.store_.read(block_id, encoding)  # verified, views of the mapped file

    def handle(self, block_id: str, encoding: Encoding) -> Any:
        return ray.put(self.read(block_id, encoding))

    def drop(self, block_id: str, encoding: Encoding) -> int:
        return 0  # the source of truth is never dropped by placement

    def inventory(self) -> list[CopyEntry]:
        return [
            CopyEntry(
                r.block_id,
                self.tier_id,
                r.encoding,
                CopyStatus.READY,
                epoch=0,
                nbytes=r.nbytes,
                checksum=r.content_checksum,
            )
            for r in self.store_.copies()
        ]

    def used_bytes(self) -> int:
        return sum(r.nbytes for r in self.store_.copies())


# PERF: below this size the checksum runs inline: handing it to a thread costs more than the
# overlap saves (a 1 MiB copy and its checksum take about 0.2 ms together).
OVERLAP_MIN_BYTES = 4 << 20


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
        if encoded.block_id != block_id or encoded.encoding != encoding:
            raise CorruptBlockError(
                f"received {encoded.block_id!r}@{encoded.encoding.name}; expected "
                f"{block_id!r}@{encoding.name}"
            )
        with self.lock:
            self.backend.reserve(block_id, encoding, encoded.nbytes)
        try:
            if encoded.nbytes >= OVERLAP_MIN_BYTES:
                # PERF: the checksum and the copy read the same (immutable) bytes on two cores:
                # 256 MiB took 51 ms one after the other, 38 ms overlapped (2-core machine).
                pending = self.checksummer.submit(encoded.content_checksum)
                held = self.backend.materialize(encoded)
                content = pending.result()
            else:
                content = encoded.content_checksum()
                held = None
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

    def load_meta(self) -> dict[str, str]:
        """The pool's placement metadata (model -> home HBM tier), kept beside the catalog."""
        path = self._store().root / "pool-meta.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def save_meta(self, meta: dict[str, str]) -> None:
        path = self._store().root / "pool-meta.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, sort_keys=True))
        tmp.replace(path)
