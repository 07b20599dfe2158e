"""The controller's admin views: tiers with their drain progress, blocks filtered and paged, one
block in full, the audit log parsed, the goals; and the frozen values they return.

A mixin of :class:`actors.controller.PlacementController` (through :class:`actors.admin_ops.
AdminOps`, which holds the goals these views read). Nothing here changes the pool.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actors.leases import LeaseTable
from actors.queries import AuditRecord
from actors.registry import CopyStatus, Registry
from pool.encoding import FULL
from pool.errors import WeightpoolError

_TO_STATE = re.compile(r"^-> ([a-z-]+):")
_RULE = re.compile(r": ([a-z-]+) vetoed ")


class UnknownIdError(WeightpoolError, LookupError):
    """A block or tier id that the pool does not have; the message names it."""


@dataclass(frozen=True)
class PinGoal:
    block_id: str
    since_s: float  # wall clock (time.time)
    reached_s: float | None = None  # when it was first seen to hold


@dataclass(frozen=True)
class DrainGoal:
    tier_id: str
    since_s: float
    done_s: float | None = None  # when the loop first saw it complete (and audited it)


@dataclass(frozen=True)
class DrainProgress:
    since_s: float
    copies_left: int
    bytes_left: int
    leased_copies_left: int
    done: bool


@dataclass(frozen=True)
class TierView:
    tier_id: str
    kind: str
    node_id: str
    capacity_bytes: int | None
    used_bytes: int | None  # None: the tier did not answer
    copies: int | None
    emulated: bool
    alive: bool
    draining: bool
    drain: DrainProgress | None


@dataclass(frozen=True)
class BlockView:
    block_id: str
    model: str
    layer: int
    kind: str
    expert: int | None
    state: str
    full_nbytes: int
    tiers: tuple[str, ...]  # tiers holding a ready copy
    pinned: bool


@dataclass(frozen=True)
class CopyView:
    tier_id: str
    tier_kind: str
    encoding: str
    status: str
    epoch: int
    nbytes: int


@dataclass(frozen=True)
class LeaseView:
    lease_id: str
    holder: str
    tier_id: str
    encoding: str
    epoch: int
    expires_in_s: float


@dataclass(frozen=True)
class AuditEntry:
    time_s: float
    kind: str
    block_id: str
    detail: str
    to_state: str | None  # transitions: the state reached
    rule: str | None  # rejections: the veto rule


@dataclass(frozen=True)
class BlockDetail:
    block: BlockView
    dtype: str
    shapes: dict[str, tuple[int, ...]]
    floor: str
    sensitivity: dict[str, float]
    copies: tuple[CopyView, ...]
    leases: tuple[LeaseView, ...]
    pin: PinGoal | None
    pin_satisfied: bool
    decision: dict[str, Any]  # the last step's view of the block (``explain``)
    history: tuple[AuditEntry, ...]  # newest first


@dataclass(frozen=True)
class Page:
    total: int
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Overview:
    tiers: tuple[TierView, ...]
    blocks: int
    models: dict[str, str]
    states: dict[str, int]
    counters: dict[str, int]
    leases: int
    quality_cost: float | None
    quality_budget: float
    rules: tuple[str, ...]
    pins: int
    drains: int


def audit_entry(record: AuditRecord) -> AuditEntry:
    to_state = _TO_STATE.match(record.detail) if record.kind == "transition" else None
    rule = _RULE.search(record.detail) if record.kind == "rejection" else None
    return AuditEntry(
        record.time_s,
        record.kind,
        record.block_id,
        record.detail,
        to_state.group(1) if to_state else None,
        rule.group(1) if rule else None,
    )


class AdminViews:
    # Provided by the controller and by AdminOps.
    lock: threading.RLock
    registry: Registry
    leases: LeaseTable
    audit_log: deque[AuditRecord]
    pins: dict[str, PinGoal]
    drains: dict[str, DrainGoal]

    if TYPE_CHECKING:

        def now(self) -> float: ...
        def status(self) -> dict[str, Any]: ...
        def block_state(self, block_id: str, device: str | None = None) -> str: ...
        def explain(self, block_id: str) -> dict[str, Any]: ...
        def audit(
            self, kind: str | None = None, block_id: str | None = None, limit: int = 100
        ) -> list[AuditRecord]: ...

    def pin_satisfied(self, block_id: str) -> bool:
        with self.lock:
            home = self.registry.home_of(block_id).tier_id
            copy = self.registry.copy(block_id, home, FULL)
            return copy is not None and copy.status is CopyStatus.READY

    def drain_progress(self, tier_id: str) -> DrainProgress | None:
        with self.lock:
            goal = self.drains.get(tier_id)
            if goal is None:
                return None
            left = self.registry.copies_on(tier_id)
            now = self.now()
            leased = sum(self.leases.pins(c.block_id, tier_id, c.encoding, now) for c in left)
            done = goal.done_s is not None and not left
            return DrainProgress(goal.since_s, len(left), sum(c.nbytes for c in left), leased, done)

    # -- views ------------------------------------------------------------------------------------

    def admin_goals(
        self,
    ) -> tuple[list[tuple[PinGoal, bool]], list[tuple[str, DrainProgress | None]]]:
        """The pins (each with whether it holds now) and the drains (with their progress)."""
        with self.lock:
            pins = [(g, self.pin_satisfied(b)) for b, g in sorted(self.pins.items())]
            drains = [(t, self.drain_progress(t)) for t in sorted(self.drains)]
        return pins, drains

    def admin_overview(self) -> Overview:
        """Tiers (with their own reports and drain progress), states, counters and goals."""
        status = self.status()
        tiers = []
        for tier_id, info in sorted(self.registry.tiers.items()):
            report = status["tiers"].get(tier_id)
            tiers.append(
                TierView(
                    tier_id,
                    info.kind.value,
                    info.node_id,
                    info.spec.capacity_bytes,
                    None if report is None else report.used_bytes,
                    None if report is None else report.copies,
                    info.spec.emulated,
                    tier_id not in status["dead_tiers"] and report is not None,
                    tier_id in self.drains,
                    self.drain_progress(tier_id),
                )
            )
        return Overview(
            tuple(tiers),
            status["blocks"],
            status["models"],
            status["states"],
            status["counters"],
            status["leases"],
            status["quality_cost"],
            status["quality_budget"],
            tuple(status["rules"]),
            len(self.pins),
            len(self.drains),
        )

    def admin_blocks(
        self,
        state: str | None = None,
        tier: str | None = None,
        layer: int | None = None,
        model: str | None = None,
        kind: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> Page:
        """Blocks in registration order, filtered (every filter given must hold), one page.

        Raises:
            UnknownIdError: ``tier`` or ``model`` is not in the pool.
        """
        with self.lock:
            if tier is not None:
                self._tier(tier)
            if model is not None and model not in self.registry.models:
                raise UnknownIdError(
                    f"no model {model!r} in the pool; models: {sorted(self.registry.models)}"
                )
            matched = []
            for block_id, spec in self.registry.specs.items():
                if (model is not None and spec.model != model) or (
                    layer is not None and spec.layer != layer
                ):
                    continue
                if kind is not None and spec.kind.value != kind:
                    continue
                copies = self.registry.copies_of(block_id)
                if tier is not None and not any(c.tier_id == tier for c in copies):
                    continue
                if state is not None and self.block_state(block_id) != state:
                    continue
                matched.append(block_id)
            items = tuple(self._block_view(b) for b in matched[offset : offset + limit])
        return Page(len(matched), items)

    def admin_block(self, block_id: str, history: int = 50) -> BlockDetail:
        """One block: copies, encodings, leases, its pin, the last decision, its audit history.

        Raises:
            UnknownIdError: no such block.
        """
        with self.lock:
            spec = self._spec(block_id)
            view = self._block_view(block_id)
            copies = tuple(
                CopyView(
                    c.tier_id,
                    self.registry.tiers[c.tier_id].kind.value,
                    c.encoding.name,
                    c.status.value,
                    c.epoch,
                    c.nbytes,
                )
                for c in sorted(self.registry.copies_of(block_id), key=lambda c: c.tier_id)
            )
            now = self.now()
            leases = tuple(
                LeaseView(
                    le.lease_id,
                    le.holder,
                    le.tier_id,
                    le.encoding.name,
                    le.epoch,
                    round(le.expires_s - now, 3),
                )
                for le in self.leases.leases.values()
                if le.block_id == block_id and le.expires_s >= now
            )
            pin = self.pins.get(block_id)
            decision = self.explain(block_id)
        records = self.audit(block_id=block_id, limit=history)
        dtypes = sorted({t.dtype for t in spec.tensors})
        return BlockDetail(
            view,
            ",".join(dtypes),
            {t.name: tuple(t.shape) for t in spec.tensors},
            spec.floor.value,
            {p.value: float(s) for p, s in spec.sensitivity.items()},
            copies,
            leases,
            pin,
            pin is not None and self.pin_satisfied(block_id),
            decision,
            tuple(audit_entry(r) for r in reversed(records)),
        )

    def admin_audit(
        self,
        kind: str | None = None,
        block_id: str | None = None,
        to_state: str | None = None,
        rule: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> Page:
        """Audit records, newest first, filtered; one page."""
        entries = [
            e
            for e in map(audit_entry, reversed(list(self.audit_log)))
            if (kind is None or e.kind == kind)
            and (block_id is None or e.block_id == block_id)
            and (to_state is None or e.to_state == to_state)
            and (rule is None or e.rule == rule)
        ]
        return Page(len(entries), tuple(entries[offset : offset + limit]))

    # -- helpers ----------------------------------------------------------------------------------

    def _spec(self, block_id: str) -> Any:
        spec = self.registry.specs.get(block_id)
        if spec is None:
            raise UnknownIdError(f"no block {block_id!r} in the pool")
        return spec

    def _tier(self, tier_id: str) -> Any:
        info = self.registry.tiers.get(tier_id)
        if info is None:
            raise UnknownIdError(
                f"no tier {tier_id!r} in the pool; tiers: {sorted(self.registry.tiers)}"
            )
        return info

    def _block_view(self, block_id: str) -> BlockView:
        spec = self.registry.specs[block_id]
        ready = sorted(
            {c.tier_id for c in self.registry.copies_of(block_id) if c.status is CopyStatus.READY}
        )
        return BlockView(
            block_id,
            spec.model,
            spec.layer,
            spec.kind.value,
            spec.expert,
            self.block_state(block_id),
            spec.full_nbytes,
            tuple(ready),
            block_id in self.pins,
        )
