"""The controller's read-only views: status, one block's copies, state and last decision, the
audit log, and the registry checked against the tier inventories.

A mixin of :class:`actors.controller.PlacementController`: nothing here changes the pool.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from actors.config import PoolConfig
from actors.leases import LeaseTable
from actors.registry import CopyStatus, Registry
from policy.plan import RULE_CODES
from pool.blocks import BlockSpec
from pool.encoding import Encoding
from pool.errors import UnknownBlockError
from pool.regen import LowRankDelta, Tied
from pool.states import Copy, derive_state
from pool.states import CopyStatus as PoolCopyStatus
from pool.tiers import TierKind


@dataclass(frozen=True)
class AuditRecord:
    time_s: float
    kind: str  # transition | rejection | fault | lease | execute
    block_id: str
    detail: str


class PoolQueries:
    # Provided by the controller.
    config: PoolConfig
    lock: threading.RLock
    registry: Registry
    leases: LeaseTable
    handles: dict[str, Any]
    demand: dict[str, int]
    audit_log: deque[AuditRecord]
    last_plan: Any

    if TYPE_CHECKING:

        def counter_values(self) -> dict[str, int]: ...
        def call(self, tier_id: str, method: str, *args: Any) -> Any: ...

    def block_state(self, block_id: str, device: str | None = None) -> str:
        """The block's state (``pool.states``) as a consumer on HBM tier ``device`` (default:
        the block's home) sees it: another device's HBM copy is a peer copy."""
        with self.lock:
            home = device or self.registry.home_of(block_id).tier_id
            copies = []
            for c in self.registry.copies_of(block_id):
                kind = self.registry.tiers[c.tier_id].kind
                if kind is TierKind.HBM and c.tier_id != home:
                    kind = TierKind.PEER
                status = (
                    PoolCopyStatus.IN_FLIGHT
                    if c.status is CopyStatus.IN_FLIGHT
                    else PoolCopyStatus.READY
                )
                copies.append(Copy(c.tier_id, kind, c.encoding, status))
        return derive_state(copies, regenerable=block_id in self.registry.recipes).value

    def status(self) -> dict[str, Any]:
        refs = {
            t: h.report.remote() for t, h in self.handles.items() if t not in self.registry.dead
        }
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=5.0)
        reports: dict[str, Any] = dict.fromkeys(self.registry.tiers)
        for tier_id, ref in refs.items():
            try:
                reports[tier_id] = ray.get(ref, timeout=0)
            except Exception:
                reports[tier_id] = None
        with self.lock:
            states = Counter(self.block_state(b) for b in self.registry.specs)
            plan = self.last_plan
            return {
                "tiers": reports,
                "dead_tiers": sorted(self.registry.dead),
                "blocks": len(self.registry.specs),
                "models": {m: e.home_hbm for m, e in self.registry.models.items()},
                "states": dict(states),
                "leases": len(self.leases.leases),
                "counters": self.counter_values(),
                "quality_cost": None if plan is None else plan.metrics.quality_cost,
                "quality_budget": self.config.policy.quality_budget,
                "rules": [r.value for r in RULE_CODES],
            }

    def explain(self, block_id: str) -> dict[str, Any]:
        """The last step's view of one block: its target and the signals behind it."""
        with self.lock:
            plan = self.last_plan
            if plan is None or block_id not in plan.block_ids:
                return {}
            i = plan.block_ids.index(block_id)
            target = int(plan.target_hbm_encoding[i])
            return {
                "target_hbm_encoding": None if target < 0 else plan.encodings[target].name,
                "target_fallback_level": int(plan.target_fallback_level[i]),
                "use_probability": float(plan.use_probability[i]),
                "time_to_next_use_s": float(plan.time_to_next_use_s[i]),
                "value_density": float(plan.value_density[i]),
                "demand": block_id in self.demand,
                "rejections": [str(r) for r in plan.rejections if r.block_id == block_id],
            }

    def regenerator(self, block_id: str) -> Tied | LowRankDelta | None:
        """The block's recipe (``pool.regen``); None for a block that is not REGENERABLE."""
        with self.lock:
            return self.registry.recipes.get(block_id)

    def model_blocks(self, model: str) -> tuple[str, list[BlockSpec], int]:
        """A registered model's home HBM tier, its block specs in layer order, and the
        full-precision bytes of the other models placed for the same tier.

        Raises:
            UnknownBlockError: no model of that name is registered.
        """
        with self.lock:
            if model not in self.registry.models:
                raise UnknownBlockError(
                    f"model {model!r} is not registered; registered: {sorted(self.registry.models)}"
                )
            home = self.registry.models[model].home_hbm
            specs = [s for s in self.registry.specs.values() if s.model == model]
            others = sum(
                s.full_nbytes
                for s in self.registry.specs.values()
                if s.model != model and self.registry.models[s.model].home_hbm == home
            )
            return home, specs, others

    def copies(self, block_id: str) -> list[tuple[str, str, str, int]]:
        with self.lock:
            return [
                (c.tier_id, c.encoding.name, c.status.value, c.epoch)
                for c in self.registry.copies_of(block_id)
            ]

    def audit(
        self, kind: str | None = None, block_id: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        records = [
            r
            for r in list(self.audit_log)
            if (kind is None or r.kind == kind) and (block_id is None or r.block_id == block_id)
        ]
        return records[-limit:]

    def consistency(self) -> list[str]:
        """Differences between the registry and the tier inventories (empty when they agree).

        Copies in transition are left out on both sides: one ``IN_FLIGHT`` may already be on
        its tier, one ``EVICTING`` may already be gone from it, and so may one whose status
        changed while the tier was asked (a drop the loop started after the caller last saw
        the controller idle, e.g. a drain's). The registry is read before and after the tier's
        inventory; only copies ``READY`` in both reads count as known."""
        problems = []
        for tier_id in self.handles:
            if tier_id in self.registry.dead:
                continue
            known_before, moving = self._ready_and_moving(tier_id)
            held = {(c.block_id, c.encoding) for c in self.call(tier_id, "inventory")}
            known_after, moving_after = self._ready_and_moving(tier_id)
            known = known_before & known_after
            moving |= moving_after | (known_before ^ known_after)
            held -= moving
            for block_id, enc in sorted(held - known, key=str):
                problems.append(f"{tier_id}: holds {block_id}@{enc.name}, registry does not know")
            for block_id, enc in sorted(known - held, key=str):
                problems.append(f"{tier_id}: registry lists {block_id}@{enc.name}, tier lacks it")
        return problems

    def _ready_and_moving(
        self, tier_id: str
    ) -> tuple[set[tuple[str, Encoding]], set[tuple[str, Encoding]]]:
        """The registry's copies on ``tier_id``: those ``READY``, and those in transition."""
        ready: set[tuple[str, Encoding]] = set()
        moving: set[tuple[str, Encoding]] = set()
        with self.lock:
            for c in self.registry.copies_on(tier_id):
                (ready if c.status is CopyStatus.READY else moving).add((c.block_id, c.encoding))
        return ready, moving
