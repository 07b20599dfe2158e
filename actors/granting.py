"""The controller's lease service (DESIGN section 4): acquire, renew, release, recall, lost copies.

A mixin of :class:`actors.controller.PlacementController`, kept apart because it is the protocol
inference actors speak; it reads and changes the controller's registry and lease table under the
controller's lock, and never calls Ray while holding it.

Recalls (see :mod:`actors.leases`). The step does not see recallable leases, so its plan may move
a copy that one pins. Before the plan is executed, :meth:`LeaseService.recall_for_plan` holds back
every transition that would drop (evict or re-encode) a copy with a live recallable lease, and
recalls that copy: it is barred (no new lease is granted on it; an acquire waits, as for a copy
not resident) and its holders learn of the recall by polling :meth:`LeaseService.recalled`. The
copies a transition submitted at once drops are barred too, so that no lease is granted on a
copy between the decision to drop it and its drop. A
holder releases at its next safe point (:class:`actors.client.PoolClient`); once no lease is left
the loop is woken, and the next step's transition runs with the copy still barred, so that no
lease is ever granted on a copy on its way out. A holder that never answers keeps the lease at
most one time-to-live: recalled leases are not extended by renewal. A barrier is lifted once its
block is not being moved and the copy is gone or the step no longer wants it moved (the leases
recalled on it stay recalled).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any

from actors.leases import CopyKey, Grant, Lease, LeaseTable, Miss
from actors.registry import CopyEntry, CopyStatus, Registry
from pool.encoding import FULL, Encoding
from pool.tiers import TierKind

if TYPE_CHECKING:
    from actors.config import PoolConfig
    from actors.executor import Executor
    from policy.plan import Plan

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
    grace_until_s: float  # after a restart: HBM copies count as leased until then

    if TYPE_CHECKING:

        def now(self) -> float: ...
        def count(self, key: str, n: int = 1) -> None: ...
        def record(self, kind: str, block_id: str, detail: str) -> None: ...
        def call(self, tier_id: str, method: str, *args: Any) -> Any: ...

    def acquire(
        self,
        holder: str,
        block_ids: list[str],
        device: str | None,
        timeout_s: float = 30.0,
        recallable: bool = False,
    ) -> list[Grant | Miss]:
        """Leases on usable copies of ``block_ids`` for ``holder`` running on HBM tier
        ``device``. A block with no HBM copy (or only a barred one, being recalled) becomes a
        demand promotion; the call waits up to ``timeout_s`` for it, then returns a
        :class:`Miss` naming the nearest copy. ``recallable``: the leases are kept by the holder
        until recalled (the module docstring); otherwise they are hard pins.

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
                grant = self._try_grant(holder, block_id, device, recallable)
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
                waiting += self._keep_granted(results)
        for block_id in waiting:
            results[block_id] = self._nearest(block_id)
        return [results[b] for b in block_ids]

    def _keep_granted(self, results: dict[str, Grant | Miss]) -> list[str]:
        """Renew (under the lock) the leases an acquire granted while it still waits for other
        blocks, since the holder renews them only once the call returns; a lease that ended
        meanwhile (revoked, or recalled and expired) is dropped from ``results`` and its block
        returned, to be leased again."""
        now = self.now()
        lost = []
        for block_id, got in list(results.items()):
            if isinstance(got, Grant):
                renewed = self.leases.renew(got.lease, now)
                if renewed is None:
                    del results[block_id]
                    lost.append(block_id)
                else:
                    results[block_id] = dataclasses.replace(got, lease=renewed)
        return lost

    def _try_grant(
        self, holder: str, block_id: str, device: str | None, recallable: bool
    ) -> Grant | None:
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
            if self.leases.is_barred(key):
                return None  # recalled meanwhile: its move waits for its leases to end
            self.executor.handles[key] = handle
            lease = self.leases.grant(
                holder, block_id, chosen.tier_id, chosen.encoding, chosen.epoch, now, recallable
            )
            self.last_use[block_id] = now
            spec = self.registry.spec(block_id)
        self.record("lease", block_id, f"lease {lease.lease_id} to {holder} on {chosen.tier_id}")
        peer = device is not None and chosen.tier_id != device
        return Grant(lease, [handle], spec, peer, self.config.lease_ttl_s, current.shared_of)

    def _best_hbm_copy(self, block_id: str, device: str | None) -> CopyEntry | None:
        """The ready HBM copy to lease: the holder's own device first; none on a draining tier
        (an admin goal empties it), none being recalled (barred)."""
        hbm = [
            c
            for c in self.registry.copies_of(block_id)
            if c.status is CopyStatus.READY
            and self.registry.tiers[c.tier_id].kind is TierKind.HBM
            and c.tier_id not in self.registry.dead
            and c.tier_id not in self.registry.draining
            and not self.leases.is_barred((block_id, c.tier_id, c.encoding))
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
        is adopted if its copy still exists at its epoch; otherwise ``None`` (fenced). A
        recalled lease comes back unchanged: not extended."""
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
        """Release ``leases`` (those that are not the table's own are ignored); returns how
        many were. Releasing the last lease on a barred copy wakes the loop: its move can run."""
        now = self.now()
        with self.lock:
            answered = [x for x in leases if x.lease_id in self.leases.recalled]
            gone = self.leases.release(leases)
            answered = [x for x in answered if x.lease_id not in self.leases.leases]
            freed = {
                x.copy_key
                for x in answered
                if self.leases.is_barred(x.copy_key) and not self.leases.live_on(x.copy_key, now)
            }
        if answered:
            self.count("lease_recalls_answered", len(answered))
            for lease in answered:
                self.record("lease", lease.block_id, f"lease {lease.lease_id} released on recall")
        if freed:
            self.wake.set()
        return gone

    # -- recalls ----------------------------------------------------------------------------------

    def recalled(self, holder: str) -> list[str]:
        """Ids of ``holder``'s leases that are recalled and not released yet (polled by
        clients that hold recallable leases)."""
        with self.lock:
            return self.leases.recalls_of(holder)

    def recall_for_plan(self, plan: Plan) -> tuple[set[int], list[CopyKey]]:
        """Recall the copies that ``plan``'s transitions would drop while recallable leases pin
        them, and settle the barriers of earlier recalls. Returns the transition rows to hold
        back this step: those whose copies are recalled (pinned until the holders release or
        the leases expire), and the copies into the same HBM tiers that do not fit until then
        (they would fail for capacity). Also held: the moves of blocks whose chain is still
        running (it may end before the submission, and the executor would then take a move
        whose copies nothing here looked at) and those that would drop a copy a plain lease
        granted since the step's snapshot pins. A later step plans them again, so that the
        executor does not try to drop a leased copy. Copies
        left on a drained tier are recalled too (the drain drops them once free).

        Also returns the re-shares to submit now: the tied blocks' copies that could share
        their source's buffer (``Registry.unshared_ties``) and that no lease pins, barred as a
        dropped copy is; kept leases on the others are recalled (plain ones are waited for).
        None in the restart's grace period. Takes the lock; no Ray call."""
        rows = plan.transition_rows
        encodings = self.registry.encodings
        with self.executor.lock:
            busy = set(self.executor.busy)
        held: set[int] = set()
        waiting: set[int] = set()  # rows held back for a reason other than a recall
        recalled: list[Lease] = []
        wanted: set[CopyKey] = set()
        now = self.now()
        with self.lock:
            moves: list[tuple[int, str, str, Encoding | None]] = []
            for i in range(len(rows.block)):
                block_id = plan.block_ids[int(rows.block[i])]
                if block_id in busy:
                    # Its chain may end before the submission: then the executor would take a
                    # move whose copies no recall below looked at. The next step plans it again.
                    waiting.add(i)
                    continue
                code = int(rows.target_encoding[i])
                home = self.registry.home_of(block_id).tier_id
                moves.append((i, block_id, home, None if code < 0 else encodings[code]))
            leaving = {i: self._leaving(b, home, target) for i, b, home, target in moves}
            for i, keys in leaving.items():
                wanted.update(keys)
                for key in keys:
                    live = self.leases.live_on(key, now)
                    if any(x.recallable for x in live):
                        recalled += self.leases.recall(key, now)
                        held.add(i)
                    elif live:  # a plain lease granted since the snapshot: the next step sees it
                        waiting.add(i)
            full = {home for i, _, home, _ in moves if i in held}
            held |= self._overflowing(moves, held | waiting, full)
            for i, keys in leaving.items():
                if i not in held and i not in waiting:  # runs now: no lease on what it drops
                    for key in keys:
                        self.leases.recall(key, now)
            reshares: list[CopyKey] = []
            planned = {block_id for _, block_id, _, _ in moves}
            for key in self.registry.unshared_ties if now >= self.grace_until_s else ():
                if key[0] in busy or key[0] in planned:
                    continue
                wanted.add(key)
                live = self.leases.live_on(key, now)
                if any(x.recallable for x in live):
                    recalled += self.leases.recall(key, now)
                elif not live:
                    self.leases.recall(key, now)  # runs now: no lease on what it drops
                    reshares.append(key)
            for tier_id in self.registry.draining:
                for c in self.registry.copies_on(tier_id):
                    key = (c.block_id, c.tier_id, c.encoding)
                    if any(x.recallable for x in self.leases.live_on(key, now)):
                        wanted.add(key)
                        recalled += self.leases.recall(key, now)
            lifted = [  # a move no longer wanted (or done) bars nothing, whoever holds leases
                key
                for key in list(self.leases.barred)
                if key[0] not in busy
                and (key not in wanted or self.registry.copy(*key) is None)
                and self.leases.lift(key)
            ]
        if recalled:
            self.count("lease_recalls", len(recalled))
            for lease in recalled:
                self.record(
                    "lease",
                    lease.block_id,
                    f"lease {lease.lease_id} of {lease.holder} recalled: the step moves "
                    f"{lease.tier_id}@{lease.encoding.name}",
                )
        self.count("recall_barriers_lifted", len(lifted))
        self.count("transitions_held_for_recall", len(held))
        self.count("transitions_held_for_lease_or_chain", len(waiting))
        return held | waiting, reshares

    def _overflowing(
        self, moves: list[tuple[int, str, str, Encoding | None]], held: set[int], tiers: set[str]
    ) -> set[int]:
        """The moves (not held) that make a new copy in one of ``tiers`` (HBM tiers whose room
        waits for recalled copies) beyond the room free now, counting every copy there, in
        flight or ready, at its size (a shared copy at none). Under the lock."""
        room = {}
        for tier_id in tiers:
            capacity = self.registry.tiers[tier_id].spec.capacity_bytes
            used = sum(  # a shared copy's bytes are its source's, counted once
                self.registry.nbytes(c.block_id, c.encoding)
                for c in self.registry.copies_on(tier_id)
                if not c.shared_of
            )
            room[tier_id] = (capacity or 1 << 62) - used
        out = set()
        for i, block_id, home, target in moves:
            if i in held or home not in room or target is None:
                continue
            if self.registry.copy(block_id, home, target) is not None:
                continue  # no new copy: the move drops others only
            need = self.registry.nbytes(block_id, target)
            if need > room[home]:
                out.add(i)
            else:
                room[home] -= need
        return out

    def _leaving(self, block_id: str, home: str, target: Encoding | None) -> list[CopyKey]:
        """The ready copies a transition of ``block_id`` to HBM encoding ``target`` drops: its
        ``home`` HBM copies at other encodings (:mod:`actors.executor`). Under the lock."""
        return [
            (block_id, c.tier_id, c.encoding)
            for c in self.registry.copies_of(block_id)
            if c.tier_id == home and c.encoding != target and c.status is CopyStatus.READY
        ]
