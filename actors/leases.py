"""Leases (DESIGN section 4): who may read which copy, until when, at which epoch.

Pure Python, no Ray; the controller owns the one :class:`LeaseTable` and calls it under its lock.
A lease names one copy (tier, encoding) and that copy's epoch. While the lease is live the copy is
pinned: the executor never drops or re-encodes it. A lease is refused on renewal (fenced) when it
expired, was revoked (its copy's tier died), or names an epoch the copy no longer has.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pool.blocks import BlockSpec
from pool.encoding import Encoding


@dataclass(frozen=True)
class Lease:
    lease_id: str  # "<controller generation>-<n>": unique across controller restarts
    holder: str
    block_id: str
    tier_id: str
    encoding: Encoding
    epoch: int
    expires_s: float  # controller clock (time.monotonic of the controller's process)


@dataclass(frozen=True)
class Grant:
    """What ``acquire`` returns per block: the lease, the copy's bytes as an object-store
    reference (mapped without copying on the holder's node), the spec to decode them, and whether
    the copy is a peer (an HBM copy on another device than the holder's)."""

    lease: Lease
    handle: list[Any]  # [ObjectRef]: wrapped so that Ray passes the reference, not the value
    spec: BlockSpec
    peer: bool
    ttl_s: float


@dataclass(frozen=True)
class Miss:
    """An acquire that could not be served by its deadline: where the nearest copy is."""

    block_id: str
    nearest_tier: str
    nearest_encoding: Encoding
    reason: str


@dataclass
class LeaseTable:
    ttl_s: float
    generation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    leases: dict[str, Lease] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def issued_here(self, lease_id: str) -> bool:
        """The lease was issued by this controller instance (not one before a restart)."""
        return lease_id.split("-", 1)[0] == self.generation

    def grant(
        self, holder: str, block_id: str, tier_id: str, encoding: Encoding, epoch: int, now_s: float
    ) -> Lease:
        lease = Lease(
            f"{self.generation}-{next(self._ids)}",
            holder,
            block_id,
            tier_id,
            encoding,
            epoch,
            now_s + self.ttl_s,
        )
        self.leases[lease.lease_id] = lease
        return lease

    def adopt(self, lease: Lease, now_s: float) -> Lease:
        """Take over a lease granted before a controller restart (its epoch was checked)."""
        renewed = dataclasses.replace(lease, expires_s=now_s + self.ttl_s)
        self.leases[lease.lease_id] = renewed
        return renewed

    def renew(self, presented: Lease, now_s: float) -> Lease | None:
        """Extend a live lease; ``None`` (fenced) if it is unknown, expired, or not the lease
        this table holds under that id (another holder, block, copy or epoch)."""
        lease = self.leases.get(presented.lease_id)
        if lease is None or not _same(lease, presented):
            return None
        if lease.expires_s < now_s:
            del self.leases[lease.lease_id]
            return None
        return self.adopt(lease, now_s)

    def release(self, leases: list[Lease]) -> int:
        """Release the presented leases; one that is not the table's lease under its id (a
        stale or forged one) is ignored."""
        gone = 0
        for presented in leases:
            stored = self.leases.get(presented.lease_id)
            if stored is not None and _same(stored, presented):
                del self.leases[presented.lease_id]
                gone += 1
        return gone

    def expire(self, now_s: float) -> list[Lease]:
        return self._revoke(lambda x: x.expires_s < now_s)

    def revoke_copy(self, block_id: str, tier_id: str, encoding: Encoding) -> list[Lease]:
        return self._revoke(
            lambda x: (x.block_id, x.tier_id, x.encoding) == (block_id, tier_id, encoding)
        )

    def revoke_tier(self, tier_id: str) -> list[Lease]:
        return self._revoke(lambda x: x.tier_id == tier_id)

    def _revoke(self, which: Callable[[Lease], bool]) -> list[Lease]:
        gone = [lease for lease in self.leases.values() if which(lease)]
        for lease in gone:
            del self.leases[lease.lease_id]
        return gone

    def pins(self, block_id: str, tier_id: str, encoding: Encoding, now_s: float) -> bool:
        """A live lease pins this copy."""
        return any(
            lease.expires_s >= now_s
            and (lease.block_id, lease.tier_id, lease.encoding) == (block_id, tier_id, encoding)
            for lease in self.leases.values()
        )

    def leased_blocks(self, now_s: float) -> set[str]:
        return {lease.block_id for lease in self.leases.values() if lease.expires_s >= now_s}


def _same(a: Lease, b: Lease) -> bool:
    """The same grant: holder, block, copy and epoch (expiry aside)."""
    return (a.holder, a.block_id, a.tier_id, a.encoding, a.epoch) == (
        b.holder,
        b.block_id,
        b.tier_id,
        b.encoding,
        b.epoch,
    )
