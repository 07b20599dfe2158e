"""Leases (DESIGN section 4): who may read which copy, until when, at which epoch.

Pure Python, no Ray; the controller owns the one :class:`LeaseTable` and calls it under its lock.
A lease names one copy (tier, encoding) and that copy's epoch. While the lease is live the copy is
pinned: the executor never drops or re-encodes it. A lease is refused on renewal (fenced) when it
expired, was revoked (its copy's tier died), or names an epoch the copy no longer has.

Two kinds of lease pin a copy the same way and differ in what the policy sees:

- a plain lease (``recallable=False``) is a hard pin: the policy's step sees its block as leased
  (:meth:`LeaseTable.pinned_blocks`) and the veto keeps its HBM copy as it is;
- a recallable lease is kept by its holder until the controller recalls it: the step does not
  see it, so it may want the copy moved; the controller then *recalls* the copy
  (:meth:`LeaseTable.recall`): the copy is barred (no new lease is granted on it), every
  recallable lease on it is marked recalled and is no longer extended by renewal, and the move
  waits until the holders released those leases, or until they expired (at most one
  time-to-live after the recall: a slow or dead holder cannot pin a copy for longer). A barrier
  is lifted by the controller (:meth:`LeaseTable.lift`) once the move was carried out or is no
  longer wanted.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

from pool.blocks import BlockSpec
from pool.encoding import Encoding

CopyKey = tuple[str, str, Encoding]  # block id, tier id, encoding


@dataclass(frozen=True)
class Lease:
    lease_id: str  # "<controller generation>-<n>": unique across controller restarts
    holder: str
    block_id: str
    tier_id: str
    encoding: Encoding
    epoch: int
    expires_s: float  # controller clock (time.monotonic of the controller's process)
    recallable: bool = False  # kept until recalled (module docstring); False: a hard pin

    @property
    def copy_key(self) -> CopyKey:
        return (self.block_id, self.tier_id, self.encoding)


@dataclass(frozen=True)
class Grant:
    """What ``acquire`` returns per block: the lease, the copy's bytes as an object-store
    reference (mapped without copying on the holder's node), the spec to decode them, whether
    the copy is a peer (an HBM copy on another device than the holder's), and, for a tied
    block's shared copy, the block whose bytes (labelled with its id) the reference holds."""

    lease: Lease
    handle: list[Any]  # [ObjectRef]: wrapped so that Ray passes the reference, not the value
    spec: BlockSpec
    peer: bool
    ttl_s: float
    shared_of: str = ""


@dataclass(frozen=True)
class Miss:
    """An acquire that could not be served by its deadline: where the nearest copy is."""

    block_id: str
    nearest_tier: str
    nearest_encoding: Encoding
    reason: str


@dataclass
class LeaseTable:
    """Every live lease, indexed by copy, and the recalls in progress. Not thread-safe: the
    controller holds its lock around every call."""

    ttl_s: float
    generation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    leases: dict[str, Lease] = field(default_factory=dict)
    by_copy: dict[CopyKey, set[str]] = field(default_factory=dict)  # copy -> lease ids
    recalled: set[str] = field(default_factory=set)  # lease ids recalled, not yet gone
    barred: dict[CopyKey, float] = field(default_factory=dict)  # copy -> when recalled
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def issued_here(self, lease_id: str) -> bool:
        """The lease was issued by this controller instance (not one before a restart)."""
        return lease_id.split("-", 1)[0] == self.generation

    def grant(
        self,
        holder: str,
        block_id: str,
        tier_id: str,
        encoding: Encoding,
        epoch: int,
        now_s: float,
        recallable: bool = False,
    ) -> Lease:
        """A new lease on the copy. The caller checks that the copy is ready and not barred."""
        lease = Lease(
            f"{self.generation}-{next(self._ids)}",
            holder,
            block_id,
            tier_id,
            encoding,
            epoch,
            now_s + self.ttl_s,
            recallable,
        )
        self._put(lease)
        return lease

    def adopt(self, lease: Lease, now_s: float) -> Lease:
        """Take over a lease granted before a controller restart (its epoch was checked)."""
        renewed = dataclasses.replace(lease, expires_s=now_s + self.ttl_s)
        self._put(renewed)
        return renewed

    def renew(self, presented: Lease, now_s: float) -> Lease | None:
        """Extend a live lease; ``None`` (fenced) if it is unknown, expired, or not the lease
        this table holds under that id (another holder, block, copy, epoch or kind). A recalled
        lease is returned as it is, not extended: it ends at its expiry at the latest."""
        lease = self.leases.get(presented.lease_id)
        if lease is None or not _same(lease, presented):
            return None
        if lease.expires_s < now_s:
            self._drop(lease.lease_id)
            return None
        if lease.lease_id in self.recalled:
            return lease
        return self.adopt(lease, now_s)

    def release(self, leases: list[Lease]) -> int:
        """Release the presented leases; one that is not the table's lease under its id (a
        stale or forged one) is ignored. Returns how many were released."""
        gone = 0
        for presented in leases:
            stored = self.leases.get(presented.lease_id)
            if stored is not None and _same(stored, presented):
                self._drop(presented.lease_id)
                gone += 1
        return gone

    def expire(self, now_s: float) -> list[Lease]:
        return self._revoke([x for x in self.leases.values() if x.expires_s < now_s])

    def revoke_copy(self, block_id: str, tier_id: str, encoding: Encoding) -> list[Lease]:
        ids = self.by_copy.get((block_id, tier_id, encoding), set())
        return self._revoke([self.leases[i] for i in ids])

    def revoke_tier(self, tier_id: str) -> list[Lease]:
        return self._revoke([x for x in self.leases.values() if x.tier_id == tier_id])

    def pins(self, block_id: str, tier_id: str, encoding: Encoding, now_s: float) -> bool:
        """A live lease, of either kind, pins this copy."""
        return bool(self.live_on((block_id, tier_id, encoding), now_s))

    def live_on(self, key: CopyKey, now_s: float) -> list[Lease]:
        """The live leases on one copy."""
        ids = self.by_copy.get(key, ())
        return [self.leases[i] for i in ids if self.leases[i].expires_s >= now_s]

    def leased_blocks(self, now_s: float) -> set[str]:
        """Blocks with a live lease of either kind."""
        return {lease.block_id for lease in self.leases.values() if lease.expires_s >= now_s}

    def pinned_blocks(self, now_s: float) -> set[str]:
        """Blocks the policy must see as leased: those with a live plain (not recallable)
        lease. A recallable lease is recalled when the policy wants its copy moved instead."""
        return {
            lease.block_id
            for lease in self.leases.values()
            if lease.expires_s >= now_s and not lease.recallable
        }

    # -- recalls ----------------------------------------------------------------------------------

    def recall(self, key: CopyKey, now_s: float) -> list[Lease]:
        """Bar the copy (no new lease on it until :meth:`lift`) and recall every live
        recallable lease on it. Returns the leases recalled by this call (not those recalled
        before). Plain leases on the copy are left alone: they pin it until they end."""
        self.barred.setdefault(key, now_s)
        fresh = [x for x in self.live_on(key, now_s) if x.recallable]
        fresh = [x for x in fresh if x.lease_id not in self.recalled]
        self.recalled.update(x.lease_id for x in fresh)
        return fresh

    def is_barred(self, key: CopyKey) -> bool:
        return key in self.barred

    def lift(self, key: CopyKey) -> bool:
        """End the barrier on a copy (True if there was one). Leases recalled on it stay
        recalled: their holders release them, or they expire."""
        return self.barred.pop(key, None) is not None

    def recalls_of(self, holder: str) -> list[str]:
        """Ids of ``holder``'s recalled leases that it has not released yet."""
        return sorted(i for i in self.recalled if self.leases[i].holder == holder)

    # -- the index --------------------------------------------------------------------------------

    def _put(self, lease: Lease) -> None:
        old = self.leases.get(lease.lease_id)
        if old is not None and old.copy_key != lease.copy_key:
            self._drop(lease.lease_id)
        self.leases[lease.lease_id] = lease
        self.by_copy.setdefault(lease.copy_key, set()).add(lease.lease_id)

    def _drop(self, lease_id: str) -> Lease | None:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return None
        ids = self.by_copy.get(lease.copy_key)
        if ids is not None:
            ids.discard(lease_id)
            if not ids:
                del self.by_copy[lease.copy_key]
        self.recalled.discard(lease_id)
        return lease

    def _revoke(self, gone: list[Lease]) -> list[Lease]:
        for lease in gone:
            self._drop(lease.lease_id)
        return gone


def _same(a: Lease, b: Lease) -> bool:
    """The same grant: holder, block, copy, epoch and kind (expiry aside)."""
    return (a.holder, a.block_id, a.tier_id, a.encoding, a.epoch, a.recallable) == (
        b.holder,
        b.block_id,
        b.tier_id,
        b.encoding,
        b.epoch,
        b.recallable,
    )
