"""Executes the controller's plans: moves bytes between tier actors, one chain per block at a time.

Each transition becomes, in order: the warm copy its fallback level needs (HOST or CXL, at full
precision), the HBM copy at its target encoding, then the drops the target implies (other HBM
encodings, warm copies slower targets no longer need). A copy is registered ``IN_FLIGHT`` before
its transfer starts and ``READY`` only once the destination verified its checksum; a copy that a
live lease pins is never dropped (the drop waits for a later step), and a copy being dropped is
``EVICTING``, on which no lease is granted.

Bytes move by Ray's object transfer (the destination pulls the source's object), except where
:func:`by_group` says so (memory tiers on different nodes, the same encoding): that copy goes
through the pool's collective group of memory tiers (:class:`actors.peer.PeerGroup`), and falls
back to the object transfer, counted as ``peer_fallbacks`` and recorded, when the group cannot
form or the copy fails.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import ray

from actors.peer import Member, PeerError, PeerGroup
from actors.regenerate import rebuild, reshare
from actors.registry import CopyEntry, CopyStatus
from policy.snapshot import CXL, HOST, LEVEL_KINDS, STORAGE
from pool.blocks import BlockSpec
from pool.encoding import FULL, Encoding, Precision
from pool.errors import CapacityError
from pool.tiers import TierKind

if TYPE_CHECKING:
    from actors.controller import PlacementController

SPEED = {TierKind.HBM: 0, TierKind.HOST: 1, TierKind.CXL: 2, TierKind.STORAGE: 3}
GROUP_KINDS = frozenset({TierKind.HBM, TierKind.HOST, TierKind.CXL})  # the peer group's members

# PERF: a large copy between memory tiers on different nodes costs less CPU through the group's
# gloo sockets than by Ray's object transfer. HOST -> HBM on the 2-core machine, alternating
# repeats, medians of the cluster's CPU seconds and of the wall time: 256 MiB (load 9, 7 runs)
# 0.29 CPU-s for the whole group copy (verified, owned) against 0.54 for Ray's transfer of the
# same bytes alone and 0.66 for the object-transfer copy, 1.23x Ray's speed; 16 MiB (load 6, 9
# runs) 30 ms against 37 by object transfer; 1 MiB 12 ms against 11. Below the threshold the
# object transfer stays: it runs several copies at once, the group one at a time.
GROUP_MIN_BYTES = 16 << 20
ROOM_WAIT_S = 2.0  # how long a copy refused for room waits for a drop of the same plan


def by_group(
    src_kind: TierKind, dst_kind: TierKind, across: bool, same_encoding: bool, nbytes: int
) -> bool:
    """Whether a copy goes through the peer group rather than Ray's object transfer: across
    nodes, at the source's own encoding (the group sends held bytes, it does not transcode),
    between memory tiers; always between two HBM tiers, otherwise from ``GROUP_MIN_BYTES`` on.
    Within a node the object store maps the source without a copy, which no socket beats."""
    if not (across and same_encoding and src_kind in GROUP_KINDS and dst_kind in GROUP_KINDS):
        return False
    return (src_kind is TierKind.HBM and dst_kind is TierKind.HBM) or nbytes >= GROUP_MIN_BYTES


class Executor:
    def __init__(self, ctl: PlacementController, pool: ThreadPoolExecutor):
        self.ctl = ctl
        self.pool = pool
        self.busy: set[str] = set()
        self.handles: dict[tuple[str, str, Encoding], Any] = {}
        self.queued = 0
        self.drops_done: dict[str, int] = {}  # tier id -> drops that freed bytes (ctl's lock)
        self.dropping: dict[str, int] = {}  # tier id -> drops under way (ctl's lock)
        self.lock = threading.Lock()
        self.peers = PeerGroup(ctl.config.namespace, ctl.config.call_timeout_s)

    def idle(self) -> bool:
        with self.lock:
            return self.queued == 0

    def submit(
        self,
        block_id: str,
        target: Encoding | None,
        fallback_level: int,
        to_state: str,
        reason: str,
    ) -> bool:
        """Queue a transition unless the block already has one queued or running."""
        if not self._claim(block_id):
            return False
        self.pool.submit(self._run, block_id, target, fallback_level, to_state, reason)
        return True

    def submit_reshare(self, block_id: str, tier_id: str, encoding: Encoding) -> bool:
        """Queue :func:`actors.regenerate.reshare` unless the block has a chain queued."""
        if not self._claim(block_id):
            return False

        def run() -> None:
            try:
                reshare(self, block_id, tier_id, encoding)
            except Exception as err:
                self.ctl.count("execute_errors")
                self.ctl.record("fault", block_id, f"reshare failed: {type(err).__name__}: {err}")
            finally:
                self._release(block_id)

        self.pool.submit(run)
        return True

    def _claim(self, block_id: str) -> bool:
        """Mark the block's chain queued; False if it has one queued or running already."""
        with self.lock:
            if block_id in self.busy:
                return False
            self.busy.add(block_id)
            self.queued += 1
        return True

    def _release(self, block_id: str) -> None:
        with self.lock:
            self.busy.discard(block_id)
            self.queued -= 1
        with self.ctl.lock:
            self.ctl.copies_changed.notify_all()  # a tied block may wait for this chain

    def _run(
        self,
        block_id: str,
        target: Encoding | None,
        fallback_level: int,
        to_state: str,
        reason: str,
    ) -> None:
        ctl = self.ctl
        try:
            self._apply(block_id, target, fallback_level)
            ctl.count(f"transition:{to_state}")
            ctl.record(
                "transition",
                block_id,
                f"-> {to_state}: {reason} (hbm {target.name if target else 'none'}, fallback "
                f"{LEVEL_KINDS[fallback_level].value})",
            )
        except Exception as err:
            ctl.count("execute_errors")
            ctl.record("fault", block_id, f"transition failed: {type(err).__name__}: {err}")
        finally:
            self._release(block_id)

    # -- one transition ---------------------------------------------------------------------------

    def _apply(self, block_id: str, target: Encoding | None, fallback_level: int) -> None:
        ctl, reg = self.ctl, self.ctl.registry
        with ctl.lock:
            spec = reg.spec(block_id)
            home = reg.home_of(block_id).tier_id
            warm = {lvl: reg.warm_tier(block_id, lvl) for lvl in (HOST, CXL)}
        if fallback_level in (HOST, CXL):
            tier = warm[fallback_level]
            if tier is not None and not self._has(block_id, tier.tier_id, FULL):
                self._copy(spec, tier.tier_id, FULL)
        if (
            target is not None
            and not self._has(block_id, home, target)
            and not rebuild(self, spec, home, target)  # else rebuilt from its inputs there
        ):
            self._copy(spec, home, target)
        with ctl.lock:
            stale = [
                c
                for c in reg.copies_of(block_id)
                if c.tier_id == home and c.encoding != target and c.status is CopyStatus.READY
            ]
            for level in (HOST, CXL):
                tier = warm[level]
                slower = fallback_level == STORAGE or (fallback_level == CXL and level == HOST)
                if tier is not None and slower:
                    stale += [c for c in reg.ready(block_id, tier.tier_id)]
        for c in stale:
            self._drop(c)

    def _has(self, block_id: str, tier_id: str, encoding: Encoding) -> bool:
        with self.ctl.lock:
            c = self.ctl.registry.copy(block_id, tier_id, encoding)
            return c is not None and c.status is CopyStatus.READY

    def _source(self, block_id: str, dst: str, encoding: Encoding) -> CopyEntry:
        """The fastest ready copy the target can be made from: the same encoding, the same
        precision (lossless decompression), or full precision (the source encodes)."""
        reg = self.ctl.registry
        node = reg.tiers[dst].node_id
        usable = [
            c
            for c in reg.copies_of(block_id)
            if c.status is CopyStatus.READY
            and c.tier_id != dst
            and not c.shared_of  # holds its source's bytes, labelled as the source's
            and c.tier_id not in self.ctl.registry.dead
            and (
                c.encoding == encoding
                or c.encoding.precision in (encoding.precision, Precision.FULL)
            )
        ]
        if not usable:
            raise RuntimeError(f"block {block_id!r} has no ready copy to make {encoding.name} from")
        return min(
            usable,
            key=lambda c: (
                SPEED[reg.tiers[c.tier_id].kind],
                reg.tiers[c.tier_id].node_id != node,
                c.encoding != encoding,
            ),
        )

    def _wait_for_room(self, tier_id: str, drops_before: int) -> bool:
        """After a copy to ``tier_id`` was refused for room: whether a drop there freed bytes
        since ``drops_before`` (``drops_done`` when the copy was registered), waiting up to
        ``ROOM_WAIT_S`` while one is under way. Transitions run side by side, so a promotion
        can reach its tier before the eviction that makes room for it; a drop not yet started
        is not waited for (it may be queued behind this very worker)."""
        with self.ctl.lock:
            self.ctl.copies_changed.wait_for(
                lambda: (
                    self.drops_done.get(tier_id, 0) > drops_before
                    or not self.dropping.get(tier_id, 0)
                ),
                timeout=ROOM_WAIT_S,
            )
            return self.drops_done.get(tier_id, 0) > drops_before

    # -- a copy's record: registered in flight, then committed or abandoned ----------------------

    def begin(self, block_id: str, dst: str, encoding: Encoding) -> tuple[int, str]:
        """Register the copy ``IN_FLIGHT`` under a new epoch (the caller holds the controller's
        lock); its epoch and the checksum it must have (empty: not known yet)."""
        reg = self.ctl.registry
        epoch = reg.new_epoch()
        reg.add_copy(CopyEntry(block_id, dst, encoding, CopyStatus.IN_FLIGHT, epoch))
        return epoch, reg.checksums.get((block_id, encoding), "")

    def abandon(self, block_id: str, dst: str, encoding: Encoding, epoch: int) -> None:
        """Forget the copy ``begin`` registered, unless it was replaced meanwhile."""
        ctl, reg = self.ctl, self.ctl.registry
        with ctl.lock:
            current = reg.copy(block_id, dst, encoding)
            if current is not None and current.epoch == epoch:
                reg.remove_copy(block_id, dst, encoding)
            ctl.copies_changed.notify_all()  # a tied block waiting on it copies instead

    def commit(self, entry: CopyEntry, handle: Any, epoch: int) -> bool:
        """Make the verified copy ``READY``; False if its tier failed meanwhile (its copies
        were forgotten). A copy landing in HBM lets the blocks tied to it share it."""
        ctl, reg = self.ctl, self.ctl.registry
        key = (entry.block_id, entry.tier_id, entry.encoding)
        with ctl.lock:
            current = reg.copy(*key)
            if current is None or current.epoch != epoch:
                return False
            entry.created_s = ctl.now()  # the controller's clock, as the policy reads it
            reg.add_copy(entry)
            reg.checksums.setdefault((entry.block_id, entry.encoding), entry.checksum)
            reg.measured(entry.block_id, entry.encoding, entry.nbytes)
            self.handles[key] = handle
            ctl.copies_changed.notify_all()  # waiting acquires look again
            in_hbm = reg.tiers[entry.tier_id].kind is TierKind.HBM
            tied = reg.tied_by.get(entry.block_id, ()) if in_hbm else ()
            if any(reg.holds_own(b, entry.tier_id, entry.encoding) for b in tied):
                ctl.wake.set()  # the next step re-shares them (``recall_for_plan``)
        return True

    def _copy(self, spec: BlockSpec, dst: str, encoding: Encoding) -> None:
        ctl, reg = self.ctl, self.ctl.registry
        block_id = spec.block_id
        with ctl.lock:
            source = self._source(block_id, dst, encoding)
            epoch, checksum = self.begin(block_id, dst, encoding)
            drops_before = self.drops_done.get(dst, 0)
            src_kind = reg.tiers[source.tier_id].kind
            dst_kind = reg.tiers[dst].kind
        start = time.perf_counter()
        try:
            try:
                entry, handle = self._transfer(spec, source, dst, encoding, epoch, checksum)
            except CapacityError:
                if not self._wait_for_room(dst, drops_before):
                    raise
                ctl.count("copies_retried_for_room")
                entry, handle = self._transfer(spec, source, dst, encoding, epoch, checksum)
        except BaseException:
            # Which actor failed (source or destination) is not known here: the controller's
            # health check finds a dead tier within a second and forgets its copies.
            self.abandon(block_id, dst, encoding, epoch)
            raise
        seconds = time.perf_counter() - start
        if not self.commit(entry, handle[0], epoch):
            return
        link = f"{src_kind.value}->{'peer' if src_kind is dst_kind else dst_kind.value}"
        ctl.count(f"bytes:{link}", entry.nbytes)
        ctl.count("transfers")
        ctl.record(
            "execute",
            block_id,
            f"{source.tier_id}@{source.encoding.name} -> {dst}@{encoding.name} "
            f"({entry.nbytes} bytes, {seconds * 1e3:.1f} ms)",
        )

    def _transfer(
        self,
        spec: BlockSpec,
        source: CopyEntry,
        dst: str,
        encoding: Encoding,
        epoch: int,
        checksum: str,
    ) -> tuple[CopyEntry, list[Any]]:
        """Make the copy: by the peer group where :func:`by_group` says so, else (or when that
        fails) by the destination pulling the source's export."""
        ctl, reg = self.ctl, self.ctl.registry
        block_id = spec.block_id
        with ctl.lock:
            members = [
                Member(t, ctl.incarnations.get(t, ""), ctl.handles[t])
                for t, info in reg.tiers.items()
                if info.kind in GROUP_KINDS and t not in reg.dead and t in ctl.handles
            ]
            src_info, dst_info = reg.tiers[source.tier_id], reg.tiers[dst]
            routed = by_group(
                src_info.kind,
                dst_info.kind,
                src_info.node_id != dst_info.node_id,
                source.encoding == encoding,
                source.nbytes,
            )
        ids = {m.tier_id for m in members}
        if routed and source.tier_id in ids and dst in ids:
            try:
                result = self.peers.copy(
                    members, source.tier_id, dst, block_id, encoding, epoch, checksum
                )
                ctl.count("peer_copies")
                return result
            except PeerError as err:
                ctl.count("peer_fallbacks")
                ctl.record("fault", block_id, f"peer copy by object transfer instead: {err}")
        receive = ctl.handles[dst].receive
        with ctl.lock:
            known = self.handles.get((block_id, source.tier_id, source.encoding))
        if known is not None and source.encoding == encoding:
            # PERF: the source copy's reference is known (its own receive returned it): the
            # destination pulls it directly, one actor call fewer than asking the source.
            try:
                result: tuple[CopyEntry, list[Any]] = ray.get(
                    receive.remote(block_id, encoding, [known], epoch, checksum),
                    timeout=ctl.config.call_timeout_s,
                )
                return result
            except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError):
                pass  # the source's actor restarted meanwhile: ask it, as below
        exported = ctl.handles[source.tier_id].export.remote(spec, source.encoding, encoding)
        result = ray.get(
            receive.remote(block_id, encoding, exported, epoch, checksum),
            timeout=ctl.config.call_timeout_s,
        )
        return result

    def _drop(self, c: CopyEntry) -> bool:
        ctl, reg = self.ctl, self.ctl.registry
        with ctl.lock:
            current = reg.copy(c.block_id, c.tier_id, c.encoding)
            if current is None or current.status is not CopyStatus.READY:
                return False
            in_grace = ctl.now() < ctl.grace_until_s and reg.tiers[c.tier_id].kind is TierKind.HBM
            if in_grace or ctl.leases.pins(c.block_id, c.tier_id, c.encoding, ctl.now()):
                ctl.count("drops_deferred_leased")
                key = (c.block_id, c.tier_id, c.encoding)
                why = (
                    "the restart's grace period"
                    if in_grace
                    else "leased by "
                    + ", ".join(
                        f"{x.holder} ({'kept' if x.recallable else 'in use'})"
                        for x in ctl.leases.live_on(key, ctl.now())
                    )
                )
                ctl.record(
                    "execute", c.block_id, f"drop of {c.tier_id}@{c.encoding.name} deferred: {why}"
                )
                return False
            current.status = CopyStatus.EVICTING
            self.dropping[c.tier_id] = self.dropping.get(c.tier_id, 0) + 1
            self.handles.pop((c.block_id, c.tier_id, c.encoding), None)
        freed = 0
        try:
            freed = ctl.call(c.tier_id, "drop", c.block_id, c.encoding)
        finally:
            with ctl.lock:
                if ctl.leases.pins(c.block_id, c.tier_id, c.encoding, ctl.now()):
                    ctl.count("lease_violations")  # an invariant: must stay 0
                reg.remove_copy(c.block_id, c.tier_id, c.encoding)
                self.dropping[c.tier_id] -= 1
                if freed:  # a shared copy's drop frees nothing while its buffer is held
                    self.drops_done[c.tier_id] = self.drops_done.get(c.tier_id, 0) + 1
                ctl.copies_changed.notify_all()  # a copy refused for room may try again
        ctl.count("drops")
        return True
