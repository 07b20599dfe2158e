"""The tier actors' backends (one small protocol, DESIGN section 3 and STYLE 6):

- :class:`MemoryBackend` for HOST, CXL and CPU-emulated HBM: each copy is one object in the Ray
  object store of the actor's node, put (and so owned) by the actor. A consumer on the same node
  maps it without copying; another node's consumer gets it by Ray's object transfer. If the actor
  dies, Ray frees the objects it owns: its copies are gone, exactly as the failure model says.
  Ray's object store is pre-allocated shared memory, so copies need no allocation of their own.
- :class:`StorageBackend` for STORAGE: the checksummed Arrow files of a ``pool.store.BlockStore``.
- ``actors.tier_device.DeviceBackend`` for HBM in real CUDA memory.

Backends are not thread-safe: :class:`actors.tier.TierActor` calls them under its lock, except
:meth:`Backend.materialize` (the copy), which runs outside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import ray

from actors.copies import CopyEntry, CopyStatus, buffer_of
from pool.codecs import EncodedBlock
from pool.encoding import Encoding
from pool.errors import CapacityError, UnknownBlockError, WeightpoolError
from pool.store import BlockStore
from pool.tiers import TierSpec


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
    at a time. A tied block's copy may :meth:`alias` another's: both keys hold one object, whose
    bytes count once, until the last of them is dropped.
    """

    shares_copies = True  # :meth:`alias` is supported (a device backend's memory is not shared)

    def __init__(self, spec: TierSpec):
        self.capacity = spec.capacity_bytes or 0
        self.held: dict[tuple[str, Encoding], _Held] = {}
        self.reserved: dict[tuple[str, Encoding], int] = {}
        self.holders: dict[int, int] = {}  # id(ref) -> keys holding it (shared copies share it)
        self.used = 0

    def _freed_by(self, key: tuple[str, Encoding]) -> int:
        old = self.held.get(key)
        return old.entry.nbytes if old and self.holders[id(old.ref)] == 1 else 0

    def reserve(self, block_id: str, encoding: Encoding, nbytes: int) -> None:
        key = (block_id, encoding)
        if key in self.reserved:
            raise CapacityError(f"copy {block_id!r}@{encoding.name} is already arriving")
        freed = self._freed_by(key)
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

    def _hold(self, key: tuple[str, Encoding], held: _Held) -> None:
        self._release(key)
        obj = id(held.ref)
        if self.holders.get(obj, 0) == 0:
            self.used += held.entry.nbytes
        self.holders[obj] = self.holders.get(obj, 0) + 1
        self.held[key] = held

    def _release(self, key: tuple[str, Encoding]) -> int:
        """Forget the copy under ``key``; the bytes freed (none while another key shares it)."""
        held = self.held.pop(key, None)
        if held is None:
            return 0
        obj = id(held.ref)
        self.holders[obj] -= 1
        if self.holders[obj]:
            return 0
        del self.holders[obj]
        self.used -= held.entry.nbytes
        return held.entry.nbytes

    def commit(self, held: Any, entry: CopyEntry) -> None:
        key = (entry.block_id, entry.encoding)
        if self.reserved.get(key) != entry.nbytes:
            raise CapacityError(
                f"copy {entry.block_id!r}@{entry.encoding.name}: {entry.nbytes} bytes were not "
                "reserved"
            )
        del self.reserved[key]
        self._hold(key, _Held(held, entry))

    def alias(self, source_id: str, entry: CopyEntry) -> Any:
        """Hold ``entry``'s copy as the one of ``source_id`` at the same encoding (tied weights):
        no byte copied, none counted. Returns the shared object's reference.

        Raises:
            UnknownBlockError: no such source copy here.
            CapacityError: the key is arriving or held already, or the source is being replaced
                (its reservation counted its bytes as freed).
        """
        key = (entry.block_id, entry.encoding)
        source = self.held.get((source_id, entry.encoding))
        if source is None:
            raise UnknownBlockError(f"no copy {source_id!r}@{entry.encoding.name} on this tier")
        if key in self.reserved or key in self.held:
            raise CapacityError(f"copy {entry.block_id!r}@{entry.encoding.name} exists already")
        if (source_id, entry.encoding) in self.reserved:
            raise CapacityError(f"copy {source_id!r}@{entry.encoding.name} is being replaced")
        entry.nbytes, entry.checksum = source.entry.nbytes, source.entry.checksum
        entry.shared_of, entry.shared_epoch = buffer_of(source.entry)  # whose id labels them
        self._hold(key, _Held(source.ref, entry))
        return source.ref

    def cancel(self, block_id: str, encoding: Encoding) -> None:
        self.reserved.pop((block_id, encoding), None)

    def handle(self, block_id: str, encoding: Encoding) -> Any:
        held = self.held.get((block_id, encoding))
        if held is None:
            raise UnknownBlockError(f"no copy {block_id!r}@{encoding.name} on this tier")
        return held.ref

    def read(self, block_id: str, encoding: Encoding) -> EncodedBlock:
        """The copy's bytes (a zero-copy view), labelled as ``block_id``'s even when shared."""
        encoded: EncodedBlock = ray.get(self.handle(block_id, encoding))
        if encoded.block_id != block_id and self.held[(block_id, encoding)].entry.shared_of:
            encoded = dataclasses.replace(encoded, block_id=block_id)  # the same buffers
        return encoded

    def drop(self, block_id: str, encoding: Encoding) -> int:
        return self._release((block_id, encoding))

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
