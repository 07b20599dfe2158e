"""The client an inference actor uses: leases with a local cache, renewal, recalls, telemetry.

Hot path: :meth:`PoolClient.get` of a block this client already leases is a dictionary lookup and
a clock comparison in-process (no remote call). A miss calls the controller's ``acquire``, which
makes it a demand promotion and waits for it. Leases are renewed in batches by a background
thread before they expire; a renewal the controller refuses (expired, revoked, stale epoch) drops
the cached entry, and the next ``get`` re-acquires (fencing). Telemetry (layer times, router
choices, cache hits) is batched and sent every ``flush_s`` without waiting for an answer.

Recalls. A lease acquired with ``recallable=True`` is kept (and renewed) until the controller
recalls it because the policy wants its copy moved (:mod:`actors.leases`). The background thread
polls the controller for recalls every ``flush_s`` while the client holds such leases, and a
recalled lease is released at the holder's next safe point, never while its tensors may be in
use:

- outside :meth:`PoolClient.using` (no holder declared a use in progress), at once, by the
  background thread;
- inside it, when the holder calls :meth:`PoolClient.release_recalled` naming the blocks it
  still uses (the torch integration does at every layer boundary), when the outermost
  ``using`` ends, and while an :meth:`PoolClient.acquire` made with ``in_use`` waits (so that
  a holder's own kept leases never stop the promotion it waits for).

A recalled lease is not extended by renewal: a holder that never reaches a safe point loses it
one time-to-live after the recall at the latest. The tensors of a released lease must not be
used any more; after a release, the next ``get`` of the block re-acquires.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.leases import Grant, Lease, Miss
from actors.names import CONTROLLER_NAME
from actors.telemetry import TelemetryBatch
from pool.codecs import decode_block
from pool.encoding import FULL
from pool.errors import WeightpoolError


class LeaseMissError(WeightpoolError):
    """A block was not made resident in HBM within the acquire deadline."""

    def __init__(self, miss: Miss):
        self.miss = miss
        super().__init__(
            f"block {miss.block_id!r}: {miss.reason}; nearest copy on {miss.nearest_tier} at "
            f"{miss.nearest_encoding.name}"
        )


RECALL_WAIT_POLL_S = 0.02  # an acquire that waits answers recalls this often


@dataclass
class CachedBlock:
    lease: Lease
    tensors: dict[str, torch.Tensor]
    expires_local_s: float  # time.monotonic() of this process
    peer: bool
    ttl_s: float


class PoolClient:
    """One per inference actor (thread-safe). ``device`` is the HBM tier it computes on."""

    def __init__(
        self,
        namespace: str = "weightpool",
        device: str | None = None,
        holder: str | None = None,
        flush_s: float = 0.05,
        acquire_timeout_s: float = 30.0,
    ):
        self.controller = ray.get_actor(CONTROLLER_NAME, namespace=namespace)
        self.device = device
        self.holder = holder or f"client-{uuid.uuid4().hex[:8]}"
        self.acquire_timeout_s = acquire_timeout_s
        self.cache: dict[str, CachedBlock] = {}
        self.lock = threading.Lock()
        self.batch = TelemetryBatch(self.holder)
        self.hits = 0
        self.misses = 0
        self.fenced = 0
        self.recalled: set[str] = set()  # lease ids recalled, not released yet
        self.recalls_answered = 0
        self.holding = 0  # depth of using(): recalled leases wait for a safe point
        self.stopping = threading.Event()
        self.flush_s = flush_s
        self.thread = threading.Thread(target=self._background, daemon=True, name="pool-client")
        self.thread.start()

    # -- leases -----------------------------------------------------------------------------------

    def get(self, block_id: str, recallable: bool = False) -> dict[str, torch.Tensor]:
        """The block's tensors; served from the lease cache when leased (no remote call). A
        miss acquires it (``recallable``: see :meth:`acquire`)."""
        entry = self.cache.get(block_id)
        if entry is not None and entry.expires_local_s > time.monotonic():
            self.hits += 1
            return entry.tensors
        self.misses += 1
        return self.acquire([block_id], recallable=recallable)[block_id]

    def acquire(
        self,
        block_ids: list[str],
        recallable: bool = False,
        in_use: Collection[str] | None = None,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Lease ``block_ids`` (one remote call), map and decode their copies, cache them.

        Args:
            recallable: keep the leases until the controller recalls them (module docstring);
                False: plain leases, hard pins until released.
            in_use: inside :meth:`using`, the blocks whose tensors the caller may still use
                while this call waits; recalled leases of every other block are released
                meanwhile. ``None``: none is released while waiting.

        Raises:
            LeaseMissError: a block was not resident in HBM within ``acquire_timeout_s``.
            UnknownBlockError: an id is not in the pool (nothing leased).
        """
        start = time.monotonic()
        out: dict[str, dict[str, torch.Tensor]] = {}
        missed: list[Miss] = []
        wanted = list(block_ids)
        for _ in range(3):  # a copy whose owner died is reported, then leased again elsewhere
            ref = self.controller.acquire.remote(
                self.holder, wanted, self.device, self.acquire_timeout_s, recallable
            )
            if in_use is not None:
                while not ray.wait([ref], timeout=RECALL_WAIT_POLL_S)[0]:
                    self.release_recalled(in_use)
            results = ray.get(ref)
            lost = []
            for result in results:
                if isinstance(result, Miss):
                    missed.append(result)
                    continue
                try:
                    out[result.lease.block_id] = self._map(result, start)
                except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError):
                    self.controller.copy_lost.remote(result.lease)
                    lost.append(result.lease.block_id)
            if not lost:
                break
            wanted = lost
        else:
            block_id = wanted[0]
            raise LeaseMissError(Miss(block_id, "", FULL, "its copies kept being lost"))
        if missed:
            raise LeaseMissError(missed[0])
        with self.lock:
            self.batch.stall_s += time.monotonic() - start
        return out

    def _map(self, grant: Grant, start: float) -> dict[str, torch.Tensor]:
        encoded = ray.get(grant.handle[0])  # zero-copy on the copy's node
        if grant.shared_of and encoded.block_id == grant.shared_of:
            encoded = dataclasses.replace(encoded, block_id=grant.spec.block_id)  # tied: no copy
        tensors = decode_block(grant.spec, encoded)
        with self.lock:
            if grant.lease.block_id in self.cache:
                self._pop(grant.lease.block_id)
            self.cache[grant.lease.block_id] = CachedBlock(
                grant.lease, tensors, start + grant.ttl_s * 0.9, grant.peer, grant.ttl_s
            )
        return tensors

    def release(self, block_ids: list[str] | None = None) -> None:
        """Release leases (all of this client's when ``block_ids`` is None)."""
        with self.lock:
            ids = list(self.cache) if block_ids is None else list(block_ids)
            gone = [self._pop(b) for b in ids if b in self.cache]
        if gone:
            ray.get(self.controller.release.remote([g.lease for g in gone]))

    # -- recalls ----------------------------------------------------------------------------------

    def hold(self) -> None:
        """A use of leased tensors begins (see :meth:`using`)."""
        with self.lock:
            self.holding += 1

    def unhold(self) -> None:
        """A use ends; when it was the outermost one, recalled leases are released now."""
        with self.lock:
            self.holding -= 1
            gone = self._take_recalled(()) if self.holding == 0 else []
        self._send_release(gone)

    @contextmanager
    def using(self) -> Iterator[None]:
        """While inside, recalled leases are released only at the safe points the caller
        names (:meth:`release_recalled`, ``acquire(..., in_use=...)``) and when the outermost
        ``using`` ends. Reentrant; thread-safe (the depth is per client, not per thread)."""
        self.hold()
        try:
            yield
        finally:
            self.unhold()

    def release_recalled(self, in_use: Collection[str] = ()) -> int:
        """Release, without waiting for the controller, every recalled lease except those of
        the blocks in ``in_use``. Returns how many. Cheap when nothing is recalled (one
        attribute read), so a holder may call it at every safe point."""
        if not self.recalled:
            return 0
        with self.lock:
            gone = self._take_recalled(in_use)
        self._send_release(gone)
        return len(gone)

    def _take_recalled(self, in_use: Collection[str]) -> list[CachedBlock]:
        """Remove (under the lock) the recalled entries of blocks not in ``in_use``."""
        if not self.recalled:
            return []
        gone = [
            self._pop(b)
            for b, e in list(self.cache.items())
            if e.lease.lease_id in self.recalled and b not in in_use
        ]
        self.recalls_answered += len(gone)
        return gone

    def _send_release(self, gone: list[CachedBlock]) -> None:
        """Release removed entries' leases without waiting for the controller."""
        if gone:
            self.controller.release.remote([g.lease for g in gone])

    def _poll_recalls(self) -> None:
        """Learn which of the recallable leases held are recalled (one remote call, only while
        some are held); release them at once when no use is in progress."""
        with self.lock:
            if not any(e.lease.recallable for e in self.cache.values()):
                return
        ids: list[str] = ray.get(self.controller.recalled.remote(self.holder))
        with self.lock:  # decided and taken at once: no use can begin in between
            held = {e.lease.lease_id for e in self.cache.values()}
            self.recalled.update(i for i in ids if i in held)
            gone = self._take_recalled(()) if self.holding == 0 else []
        self._send_release(gone)

    def _pop(self, block_id: str) -> CachedBlock:
        """Remove a cache entry (under the lock) and forget its recall."""
        entry = self.cache.pop(block_id)
        self.recalled.discard(entry.lease.lease_id)
        return entry

    def lease_of(self, block_id: str) -> Lease | None:
        entry = self.cache.get(block_id)
        return None if entry is None else entry.lease

    # -- telemetry --------------------------------------------------------------------------------

    def record_layer(self, model: str, layer: int, seconds: float) -> None:
        with self.lock:
            self.batch.layer_times.append((model, layer, seconds))
            self.batch.positions[model] = layer

    def record_route(self, model: str, step: int, layer: int, experts: list[int]) -> None:
        with self.lock:
            self.batch.routes.append((model, step, layer, tuple(int(e) for e in experts)))

    def set_concurrency(self, model: str, sequences: int) -> None:
        with self.lock:
            self.batch.concurrency[model] = sequences

    def flush(self) -> None:
        with self.lock:
            batch = self.batch
            batch.cache_hits, batch.cache_misses = self.hits, self.misses
            self.hits = self.misses = 0
            self.batch = TelemetryBatch(self.holder)
        if not batch.empty():
            self.controller.report_telemetry.remote(batch)

    # -- background -------------------------------------------------------------------------------

    def _renew_due(self) -> None:
        """Renew, in one call, the leases with less than half their time-to-live left."""
        now = time.monotonic()
        with self.lock:
            due = [e.lease for e in self.cache.values() if e.expires_local_s - now < e.ttl_s / 2]
        if not due:
            return
        start = time.monotonic()
        renewed: list[Lease | None] = ray.get(self.controller.renew.remote(due))
        with self.lock:
            for old, new in zip(due, renewed, strict=True):
                entry = self.cache.get(old.block_id)
                if entry is None or entry.lease.lease_id != old.lease_id:
                    continue
                if new is None:
                    self._pop(old.block_id)  # fenced: the next get re-acquires
                    self.fenced += 1
                elif new.expires_s > old.expires_s:  # a recalled lease is not extended
                    entry.lease = new
                    entry.expires_local_s = start + entry.ttl_s * 0.9

    def _background(self) -> None:
        while not self.stopping.wait(self.flush_s):
            try:
                self.flush()
                self._renew_due()
                self._poll_recalls()
            except Exception:  # the controller is restarting: try again next period
                continue

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2.0)
        try:
            self.flush()
            self.release()
        except Exception:
            pass

    def __enter__(self) -> PoolClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
