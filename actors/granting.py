"""The controller's lease service (DESIGN section 4): acquire, renew, release, and lost copies.

A mixin of :class:`actors.controller.PlacementController`, kept apart because it is the protocol
inference actors speak; it reads and changes the controller's registry and lease table under the
controller's lock, and never calls Ray while holding it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from actors.leases import Grant, Lease, LeaseTable, Miss
from actors.registry import CopyEntry, CopyStatus, Registry
from pool.encoding import FULL
from pool.tiers import TierKind

if TYPE_CHECKING:
    from actors.config import PoolConfig
    from actors.executor import Executor

DEMAND_POLL_S = 0.05  # a waiting acquire re-raises its demand this often (the loop re-plans)
NEAREST_ORDER = {TierKind.HBM: 0, TierKind.HOST: 1, TierKind.CXL: 2, TierKind.STORAGE: 3}


class LeaseService:
    # Provided by the controller.
    config: PoolConfig
    lock: threading.RLock
    copies_changed: threading.Condition
    registry: Registry
    leases: LeaseTable
    executor: Executor
    demand: dict[str, int]
    last_use: dict[str, float]
    incarnations: dict[str, str]
    wake: threading.Event

    if TYPE_CHECKING:

        def now(self) -> float: ...
        def count(self, key: str, n: int = 1) -> None: ...
        def record(self, kind: str, block_id: str, detail: str) -> None: ...
        def call(self, tier_id: str, method: str, *args: Any) -> Any: ...

    def acquire(
        self, holder: str, block_ids: list[str], device: str | None, timeout_s: float = 30.0
    ) -> list[Grant | Miss]:
        """Leases on usable copies of ``block_ids`` for ``holder`` running on HBM tier
        ``device``. A block with no HBM copy becomes a demand promotion; the call waits up to
        ``timeout_s`` for it, then returns a :class:`Miss` naming the nearest copy.

        Raises:
            UnknownBlockError: an id is not in the pool (nothing leased, nothing demanded).
        """
        for block_id in block_ids:
            self.registry.spec(block_id)
        results: dict[str, Grant | Miss] = {}
        deadline = self.now() + timeout_s
        waiting = list(block_ids)
        first = True
        while waiting:
            still = []
            for block_id in waiting:
                grant = self._try_grant(holder, block_id, device)
                if grant is None:
                    still.append(block_id)
                    continue
                results[block_id] = grant
                self.count("lease_grants_resident" if first else "lease_grants_after_miss")
            waiting = still
            if not waiting:
                break
            if first:
                self.count("lease_misses", len(waiting))
                first = False
            remaining = deadline - self.now()
            if remaining <= 0:
                break
            with self.lock:
                for block_id in waiting:
                    self.demand[block_id] = self.demand.get(block_id, 0) + 1
                self.wake.set()
                self.copies_changed.wait(min(remaining, DEMAND_POLL_S))
                for block_id in waiting:
                    left = self.demand.pop(block_id, 0) - 1
                    if left > 0:
                        self.demand[block_id] = left
        for block_id in waiting:
            results[block_id] = self._nearest(block_id)
        return [results[b] for b in block_ids]

    def _try_grant(self, holder: str, block_id: str, device: str | None) -> Grant | None:
        with self.lock:
            chosen = self._best_hbm_copy(block_id, device)
            if chosen is None:
                return None
            key = (block_id, chosen.tier_id, chosen.encoding)
            handle = self.executor.handles.get(key)
        if handle is None:  # a copy adopted after a restart: ask its tier for the reference
            try:
                handle = self.call(chosen.tier_id, "handle", block_id, chosen.encoding)[0]
            except Exception:
                return None
        now = self.now()
        with self.lock:
            current = self.registry.copy(*key)
            if current is None or current.status is not CopyStatus.READY:
                return None  # dropped or evicting meanwhile: never lease a copy on its way out
            if current.epoch != chosen.epoch:
                return None  # replaced meanwhile: the reference is of the old copy
            self.executor.handles[key] = handle
            lease = self.leases.grant(
                holder, block_id, chosen.tier_id, chosen.encoding, chosen.epoch, now
            )
            self.last_use[block_id] = now
            spec = self.registry.spec(block_id)
        self.record("lease", block_id, f"lease {lease.lease_id} to {holder} on {chosen.tier_id}")
        peer = device is not None and chosen.tier_id != device
        return Grant(lease, [handle], spec, peer, self.config.lease_ttl_s)

    def _best_hbm_copy(self, block_id: str, device: str | None) -> CopyEntry | None:
        """The ready HBM copy to lease: the holder's own device first; none on a draining tier
        (an admin goal empties it)."""
        hbm = [
            c
            for c in self.registry.copies_of(block_id)
            if c.status is CopyStatus.READY
            and self.registry.tiers[c.tier_id].kind is TierKind.HBM
            and c.tier_id not in self.registry.dead
            and c.tier_id not in self.registry.draining
        ]
        return min(hbm, key=lambda c: (c.tier_id != device, c.tier_id), default=None)

    def _nearest(self, block_id: str) -> Miss:
        with self.lock:
            ready = [c for c in self.registry.copies_of(block_id) if c.status is CopyStatus.READY]
            best = min(
                ready,
                key=lambda c: NEAREST_ORDER[self.registry.tiers[c.tier_id].kind],
                default=None,
            )
            storage = self.registry.storage_tier().tier_id
        if best is None:
            return Miss(block_id, storage, FULL, "no ready copy yet (being imported or rebuilt)")
        return Miss(block_id, best.tier_id, best.encoding, "not resident in HBM by the deadline")

    def renew(self, leases: list[Lease]) -> list[Lease | None]:
        """Renew leases; a lease of an earlier controller instance (granted before a restart)
        is adopted if its copy still exists at its epoch; otherwise ``None`` (fenced)."""
        now = self.now()
        out: list[Lease | None] = []
        with self.lock:
            for lease in leases:
                renewed = self.leases.renew(lease, now)
                if renewed is None and not self.leases.issued_here(lease.lease_id):
                    copy = self.registry.copy(lease.block_id, lease.tier_id, lease.encoding)
                    if (
                        copy is not None
                        and copy.status is CopyStatus.READY
                        and copy.epoch == lease.epoch
                        and lease.lease_id not in self.leases.leases
                    ):
                        renewed = self.leases.adopt(lease, now)
                out.append(renewed)
        self.count("lease_fenced", out.count(None))
        return out

    def copy_lost(self, lease: Lease) -> None:
        """A holder could not map the copy its lease names (its owner died): forget the copy,
        revoke the leases on it, and have the next health check reconcile its tier."""
        with self.lock:
            copy = self.registry.copy(lease.block_id, lease.tier_id, lease.encoding)
            if copy is not None and copy.epoch == lease.epoch:
                self.registry.remove_copy(lease.block_id, lease.tier_id, lease.encoding)
                self.executor.handles.pop((lease.block_id, lease.tier_id, lease.encoding), None)
            revoked = self.leases.revoke_copy(lease.block_id, lease.tier_id, lease.encoding)
            self.incarnations.pop(lease.tier_id, None)
        self.record(
            "fault", lease.block_id, f"copy on {lease.tier_id} lost: {len(revoked)} leases revoked"
        )
        self.wake.set()

    def release(self, leases: list[Lease]) -> int:
        with self.lock:
            return self.leases.release(leases)
