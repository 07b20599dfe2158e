"""Peer copies between memory tiers on different nodes by a ``ray.util.collective`` group
(DESIGN section 3): between HBM tiers, and large copies between any memory tiers (HBM, HOST, CXL;
``actors.executor.by_group`` decides), since gloo's sockets cost less CPU than Ray's object
transfer for the same bytes.

Two halves:

- :class:`PeerEndpoint`, mixed into :class:`actors.tier.TierActor`: join a collective group,
  send a held copy to a rank, receive one from a rank and keep it (verified against its checksum,
  exactly as an object transfer is);
- :class:`PeerGroup`, used by the controller's executor: the one group of the pool's live
  memory tiers, formed on first use and formed again when those tiers (or their incarnations)
  change.

Backend: ``ray.util.collective``'s GLOO group (Ray 2.60 implements it on ``torch.distributed``'s
gloo, so it runs on CPU and in CI). The bytes sent are the host bytes ``backend.read`` gives, also
for a tier holding CUDA memory: an NCCL path (Ray's NCCL group needs cupy) is not built. The torch
gloo group initialises ``torch.distributed``'s default process group once per process, so an
actor is in one peer group at a time: joining a new group leaves the old one first, and the
executor keeps one group for all memory tiers.

Wire protocol, per copy, on the ordered pair (source rank, destination rank): an int64 header
``[status, skeleton bytes, chunk bytes]``, the pickled skeleton (block id, encoding and each
part's role, dtype, shape and byte count; the error message when ``status`` is not 0), then each
part's bytes in chunks of at most ``chunk bytes``. The receiver computes the checksum of each
chunk on another thread while the next one arrives, so only the copy into its own object is left
when the last chunk is in. The receiver always reads everything the sender announced before it
fails, and the sender always sends a header (with an error if it has no such copy), so neither
side waits on a message that never comes. One copy at a time per group (the executor serialises
them): messages of two copies on the same pair never interleave. A member that dies mid-copy
closes its sockets, which fails the other side's send or receive; a live member that stops
answering is waited for up to the pool's call timeout (the group's gloo timeout).
"""

from __future__ import annotations

import pickle
import threading
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
import xxhash

from pool.codecs import EncodedBlock, EncodedTensor, Part
from pool.encoding import Encoding
from pool.errors import WeightpoolError

STATUS_OK, STATUS_ERROR = 0, 1
# PERF: a chunk's checksum runs while the next chunk arrives. 256 MiB HOST -> HBM through the
# group on the loaded 2-core machine, chunk sizes alternating, two runs (7 and 11 repeats,
# load 7 to 9), median speed against Ray's raw transfer: 64 MiB 1.23x and 0.82x, 32 MiB 1.33x
# and 1.14x, 16 MiB 1.20x and 1.08x.
CHUNK_BYTES = 32 << 20


class PeerError(WeightpoolError):
    """A peer copy could not be made (the group did not form, a member failed, or the source
    had no such copy); the executor falls back to Ray's object transfer."""


def _collective() -> Any:
    from ray.util import collective

    return collective


def _tensor(data: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # views of object-store memory are read-only: only read
        return torch.from_numpy(data)


class PeerEndpoint:
    """The tier actor's side of peer copies (a mixin: needs ``_keep``, ``backend``, ``lock``)."""

    peer_group: str | None = None
    peer_hashing: ThreadPoolExecutor | None = None

    def peer_join(self, group: str, world_size: int, rank: int, timeout_s: float) -> str:
        """Join ``group`` as ``rank`` of ``world_size``, leaving the group this actor was in.

        Blocks until every rank has joined. Returns the backend used ("GLOO").

        Raises:
            RuntimeError (Ray's or torch's): the group did not form within ``timeout_s``.
        """
        collective = _collective()
        self.peer_leave()
        import torch.distributed.distributed_c10d as c10d

        # Ray's torch gloo group takes torch's default timeout (30 min); a peer copy whose other
        # side is gone must fail within the pool's call timeout instead (this process only).
        c10d.default_pg_timeout = timedelta(seconds=timeout_s)
        backend = "GLOO"
        collective.init_collective_group(
            world_size, rank, backend=backend, group_name=group, gloo_timeout=int(timeout_s * 1e3)
        )
        self.peer_group = group
        return backend

    def peer_leave(self) -> None:
        """Leave the current group, if any (idempotent); the process can then join another."""
        group, self.peer_group = self.peer_group, None
        if group is None:
            return
        collective = _collective()
        if collective.is_group_initialized(group):
            collective.destroy_collective_group(group)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def peer_send(self, block_id: str, encoding: Encoding, dst_rank: int, group: str) -> int:
        """Send the held copy ``block_id@encoding`` to ``dst_rank``; its byte count. A missing
        copy is announced to the receiver (which raises) and raised here too."""
        collective = _collective()
        try:
            with self.lock:  # type: ignore[attr-defined]
                encoded: EncodedBlock | None = self.backend.read(block_id, encoding)  # type: ignore[attr-defined]
            skeleton = pickle.dumps(_skeleton(encoded))
            status = STATUS_OK
        except WeightpoolError as err:
            encoded, status = None, STATUS_ERROR
            skeleton = pickle.dumps(f"{type(err).__name__}: {err}")
        header = torch.tensor([status, len(skeleton), CHUNK_BYTES], dtype=torch.int64)
        collective.send(header, dst_rank, group)
        collective.send(_tensor(np.frombuffer(skeleton, dtype=np.uint8)), dst_rank, group)
        if encoded is None:
            raise PeerError(pickle.loads(skeleton))
        for tensor in encoded.tensors:
            for part in tensor.parts:
                for start in range(0, part.data.nbytes, CHUNK_BYTES):
                    chunk = part.data[start : start + CHUNK_BYTES]
                    collective.send(_tensor(chunk), dst_rank, group)
        return encoded.nbytes

    def peer_receive(
        self,
        block_id: str,
        encoding: Encoding,
        src_rank: int,
        group: str,
        epoch: int,
        checksum: str,
    ) -> tuple[Any, list[Any]]:
        """Receive a copy sent by ``src_rank``'s :meth:`peer_send` and keep it as ``receive``
        does (verified, capacity reserved, one owned object); its record and a reference.

        Raises:
            PeerError: the source announced an error; nothing stored.
            CorruptBlockError, CapacityError: as ``TierActor.receive``; nothing stored.
        """
        collective = _collective()
        header = torch.zeros(3, dtype=torch.int64)
        collective.recv(header, src_rank, group)
        skeleton_bytes = torch.empty(int(header[1]), dtype=torch.uint8)
        collective.recv(skeleton_bytes, src_rank, group)
        skeleton = pickle.loads(skeleton_bytes.numpy().tobytes())
        if int(header[0]) != STATUS_OK:
            raise PeerError(f"peer {src_rank} could not send {block_id!r}: {skeleton}")
        shape, chunk_bytes = _Shape(*skeleton), int(header[2])
        buffer = np.empty(shape.nbytes, dtype=np.uint8)  # filled in place by the receives
        digest = xxhash.xxh3_128()  # as EncodedBlock.content_checksum: every part, in order
        hashed: list[Future[None]] = []
        tensors, offset = [], 0
        for name, precision, parts in shape.tensors:
            built = []
            for role, dtype, part_shape, nbytes in parts:
                view = buffer[offset : offset + nbytes]
                offset += nbytes
                for start in range(0, nbytes, chunk_bytes):
                    chunk = view[start : start + chunk_bytes]
                    collective.recv(torch.from_numpy(chunk), src_rank, group)
                    hashed.append(self._peer_hasher().submit(digest.update, chunk.data))
                built.append(Part(role, dtype, part_shape, view))
            tensors.append(EncodedTensor(name, precision, tuple(built)))
        for future in hashed:
            future.result()
        encoded = EncodedBlock(shape.block_id, shape.encoding, tuple(tensors))
        return self._keep(block_id, encoding, encoded, epoch, checksum, digest.hexdigest())  # type: ignore[attr-defined,no-any-return]

    def _peer_hasher(self) -> ThreadPoolExecutor:
        """One thread: the chunks' checksum updates must run in order."""
        if self.peer_hashing is None:
            self.peer_hashing = ThreadPoolExecutor(1, thread_name_prefix="peer-checksum")
        return self.peer_hashing


@dataclass(frozen=True)
class _Shape:
    block_id: str
    encoding: Encoding
    tensors: tuple[tuple[str, Any, tuple[tuple[str, str, tuple[int, ...], int], ...]], ...]

    @property
    def nbytes(self) -> int:
        return sum(p[3] for _, _, parts in self.tensors for p in parts)


def _skeleton(encoded: EncodedBlock) -> tuple[Any, ...]:
    tensors = tuple(
        (t.name, t.precision, tuple((p.role, p.dtype, p.shape, p.data.nbytes) for p in t.parts))
        for t in encoded.tensors
    )
    return (encoded.block_id, encoded.encoding, tensors)


@dataclass(frozen=True)
class Member:
    tier_id: str
    incarnation: str
    handle: Any


class PeerGroup:
    """The executor's one collective group over the pool's live memory tiers.

    :meth:`copy` forms the group when its members changed (ranks in tier-id order), makes one
    copy at a time through it, and raises :class:`PeerError` when the group cannot form or the
    copy fails (the group is then formed again next time). A membership that failed to form is
    not tried again until it changes, so a pool where gloo cannot connect pays the timeout once.
    """

    def __init__(self, namespace: str, timeout_s: float):
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self.name: str | None = None
        self.formed: tuple[tuple[str, str], ...] = ()
        self.failed: tuple[tuple[str, str], ...] | None = None
        self.ranks: dict[str, int] = {}
        self.backend = ""

    def copy(
        self,
        members: list[Member],
        src: str,
        dst: str,
        block_id: str,
        encoding: Encoding,
        epoch: int,
        checksum: str,
    ) -> tuple[Any, list[Any]]:
        """Copy ``block_id@encoding`` from tier ``src`` to tier ``dst`` (both in ``members``);
        the destination's ``peer_receive`` result."""
        by_id = {m.tier_id: m for m in members}
        with self.lock:
            self._ensure(sorted(members, key=lambda m: m.tier_id))
            name = self.name
            assert name is not None
            sent = by_id[src].handle.peer_send.remote(block_id, encoding, self.ranks[dst], name)
            received = by_id[dst].handle.peer_receive.remote(
                block_id, encoding, self.ranks[src], name, epoch, checksum
            )
            try:
                ray.get(sent, timeout=self.timeout_s)
                result: tuple[Any, list[Any]] = ray.get(received, timeout=self.timeout_s)
            except WeightpoolError:
                raise  # a refusal (no such copy, checksum, capacity): the group is fine
            except Exception as err:
                self.formed = ()  # a member failed mid-copy: form the group again next time
                raise PeerError(f"peer copy {src} -> {dst} failed: {err}") from err
            return result

    def _ensure(self, members: list[Member]) -> None:
        key = tuple((m.tier_id, m.incarnation) for m in members)
        if key == self.formed:
            return
        if key == self.failed:
            raise PeerError(f"the peer group of {[m.tier_id for m in members]} did not form")
        name = f"{self.namespace}-peer-{uuid.uuid4().hex[:8]}"
        joins = [
            m.handle.peer_join.remote(name, len(members), rank, self.timeout_s)
            for rank, m in enumerate(members)
        ]
        try:
            backends = ray.get(joins, timeout=self.timeout_s)
        except Exception as err:
            self.failed, self.formed, self.name = key, (), None
            raise PeerError(f"the peer group did not form: {type(err).__name__}: {err}") from err
        self.formed, self.failed, self.name = key, None, name
        self.ranks = {m.tier_id: rank for rank, m in enumerate(members)}
        self.backend = str(backends[0])
