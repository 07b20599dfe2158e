"""The placement controller: one named, detached actor that runs the policy and executes its plans.

It holds the registry (blocks, tiers, copies), the lease table and a bounded audit log. A control
thread runs ``policy.step`` every ``tick_s`` and at once on events (a lease miss, new telemetry);
the plan's transitions are executed by a pool of worker threads through the tier actors, one
chain of moves per block at a time. Ray runs the actor with many concurrent calls (threads); one
lock guards the registry and the leases, and no Ray call is made while holding it.

Restart (``max_restarts``): the constructor rebuilds everything from the storage catalog, the
pool's metadata (which model is placed for which device) and the tier actors' inventories. Leases
held across a restart are re-validated by epoch when their holder renews them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray

from actors.config import PoolConfig
from actors.executor import Executor
from actors.leases import Grant, Lease, LeaseTable, Miss
from actors.names import tier_actor_name
from actors.registry import CopyStatus, Registry, TierInfo
from actors.telemetry import TelemetryBatch, TelemetryBuffer
from policy.plan import RULE_CODES, STATE_CODES
from policy.snapshot import HBM
from policy.state import initial_state
from policy.step import step
from pool.blocks import BlockSpec
from pool.encoding import FULL
from pool.errors import DuplicateBlockError, UnknownBlockError
from pool.states import Copy, derive_state
from pool.states import CopyStatus as PoolCopyStatus
from pool.tiers import TierKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditRecord:
    time_s: float
    kind: str  # transition | rejection | fault | lease | execute
    block_id: str
    detail: str


class PlacementController:
    def __init__(self, config: PoolConfig, tiers: list[TierInfo]):
        self.config = config
        self.lock = threading.RLock()
        self.registry = Registry(encodings=config.parsed_encodings)
        self.handles: dict[str, Any] = {}
        for info in tiers:
            self.registry.add_tier(info)
            self.handles[info.tier_id] = ray.get_actor(
                tier_actor_name(info.tier_id), namespace=config.namespace
            )
        self.incarnations: dict[str, str] = {}
        self.dead_tiers: set[str] = set()
        self.leases = LeaseTable(config.lease_ttl_s)
        self.audit_log: deque[AuditRecord] = deque(maxlen=config.audit_log_size)
        self.counters: Counter[str] = Counter()
        self.telemetry = TelemetryBuffer()
        self.demand: dict[str, int] = {}
        self.ready_events: dict[str, threading.Event] = {}
        self.last_use: dict[str, float] = {}
        self.policy_state: Any = None
        self.last_plan_metrics: Any = None
        self.last_plan: Any = None
        self.executor = Executor(self, ThreadPoolExecutor(config.transfer_threads))
        self.started_s = time.monotonic()
        # Holders of leases granted by a previous instance renew within one TTL; until then
        # every HBM copy counts as pinned (DESIGN section 4: a leased copy is never dropped).
        self.grace_until_s = 0.0
        self._recover()
        if self.registry.blocks_in_hbm():  # a restart: HBM copies outlived the last instance
            self.grace_until_s = self.now() + config.lease_ttl_s
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.loop_thread = threading.Thread(target=self._loop, name="control-loop", daemon=True)
        self.loop_thread.start()

    # -- clock and audit --------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic()

    def record(self, kind: str, block_id: str, detail: str) -> None:
        self.audit_log.append(AuditRecord(time.time(), kind, block_id, detail))

    def call(self, tier_id: str, method: str, *args: Any) -> Any:
        """A blocking call to a tier actor with the configured timeout; a dead actor is handled
        (its copies forgotten, leases on them revoked) before the error is raised again."""
        try:
            return ray.get(
                getattr(self.handles[tier_id], method).remote(*args),
                timeout=self.config.call_timeout_s,
            )
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            self.tier_failed(tier_id, err)
            raise

    def tier_failed(self, tier_id: str, err: BaseException) -> None:
        with self.lock:
            gone = self.registry.drop_tier_copies(tier_id)
            revoked = self.leases.revoke_tier(tier_id)
            self.incarnations.pop(tier_id, None)
            self.counters["tier_faults"] += 1
        self.record(
            "fault",
            "",
            f"tier {tier_id} failed ({type(err).__name__}): {len(gone)} copies forgotten, "
            f"{len(revoked)} leases revoked",
        )
        self.wake.set()

    # -- recovery ---------------------------------------------------------------------------------

    def _storage_id(self) -> str:
        return self.registry.storage_tier().tier_id

    def _recover(self) -> None:
        storage = self._storage_id()
        specs: list[BlockSpec] = self.call(storage, "specs")
        meta: dict[str, str] = self.call(storage, "load_meta")
        by_model: dict[str, list[BlockSpec]] = {}
        for spec in specs:
            by_model.setdefault(spec.model, []).append(spec)
        for model, home in meta.items():
            if model in by_model and home in self.registry.tiers:
                self.registry.add_model(model, by_model[model], home)
        self.refresh_inventories()

    def refresh_inventories(self) -> None:
        """Reconcile the registry with every tier's inventory; mark unreachable tiers dead."""
        for tier_id in list(self.handles):
            try:
                report = self.call(tier_id, "report")
                inventory = self.call(tier_id, "inventory")
            except Exception as err:  # a dead or unreachable tier
                self.dead_tiers.add(tier_id)
                self.record("fault", "", f"tier {tier_id} unreachable: {type(err).__name__}")
                continue
            self.dead_tiers.discard(tier_id)
            with self.lock:
                forgotten, adopted = self.registry.reconcile(tier_id, inventory, self.now())
                self.incarnations[tier_id] = report.incarnation
                for c in inventory:
                    if c.block_id in self.registry.specs and c.checksum:
                        self.registry.checksums.setdefault((c.block_id, c.encoding), c.checksum)
                        self.registry.measured(c.block_id, c.encoding, c.nbytes)
            if forgotten or adopted:
                self.record(
                    "fault" if forgotten else "execute",
                    "",
                    f"tier {tier_id} reconciled: {forgotten} forgotten, {adopted} adopted",
                )

    def _check_tiers(self) -> None:
        """Detect restarted (emptied) and dead tier actors; reconcile the restarted ones."""
        refs = {t: h.report.remote() for t, h in self.handles.items()}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=5.0)
        for tier_id, ref in refs.items():
            try:
                report = ray.get(ref, timeout=0)
            except Exception as err:
                if tier_id not in self.dead_tiers:
                    self.dead_tiers.add(tier_id)
                    self.tier_failed(tier_id, err)
                continue
            self.dead_tiers.discard(tier_id)
            if self.incarnations.get(tier_id) != report.incarnation:
                inventory = self.call(tier_id, "inventory")
                with self.lock:
                    forgotten, _ = self.registry.reconcile(tier_id, inventory, self.now())
                    self.incarnations[tier_id] = report.incarnation
                    revoked = [
                        lease
                        for lease in list(self.leases.leases.values())
                        if lease.tier_id == tier_id
                        and self.registry.copy(lease.block_id, tier_id, lease.encoding) is None
                    ]
                    for lease in revoked:
                        del self.leases.leases[lease.lease_id]
                self.record(
                    "fault",
                    "",
                    f"tier {tier_id} restarted: {forgotten} copies forgotten, "
                    f"{len(revoked)} leases revoked",
                )

    # -- models -----------------------------------------------------------------------------------

    def register_model(self, model: str, specs: list[BlockSpec], home_hbm: str | None) -> str:
        """Register an imported model's blocks, placed for ``home_hbm`` (default: the live HBM
        tier with the most capacity left after the models already placed). Returns the home."""
        self.check_new_model(model, home_hbm)
        storage = self._storage_id()
        inventory = self.call(storage, "inventory")
        with self.lock:  # the blocks and their storage copies appear to the loop together
            if home_hbm is None:
                home_hbm = self._least_loaded_hbm()
            self.registry.add_model(model, specs, home_hbm)
            self.registry.reconcile(storage, inventory, self.now())
            for c in inventory:
                if c.block_id in self.registry.specs:
                    self.registry.checksums.setdefault((c.block_id, c.encoding), c.checksum)
            self.policy_state = None  # the model set changed: the policy's arrays are resized
            meta = {m: e.home_hbm for m, e in self.registry.models.items()}
        self.call(storage, "save_meta", meta)
        self.record("execute", "", f"model {model}: {len(specs)} blocks placed for {home_hbm}")
        self.wake.set()
        return home_hbm

    def check_new_model(self, model: str, home_hbm: str | None) -> None:
        """Everything ``register_model`` checks before anything is imported (bad input leaves
        the pool unchanged).

        Raises:
            DuplicateBlockError: the model is registered already.
            UnknownBlockError: ``home_hbm`` is not a live HBM tier.
        """
        with self.lock:
            if model in self.registry.models:
                raise DuplicateBlockError(f"model {model!r} is already registered")
            hbm = [t.tier_id for t in self.registry.tiers_of(TierKind.HBM)]
            if home_hbm is not None and (home_hbm not in hbm or home_hbm in self.dead_tiers):
                raise UnknownBlockError(
                    f"home tier {home_hbm!r} is not a live HBM tier of this pool; HBM tiers: "
                    f"{[t for t in hbm if t not in self.dead_tiers]}"
                )

    def _least_loaded_hbm(self) -> str:
        hbm = [t for t in self.registry.tiers_of(TierKind.HBM) if t.tier_id not in self.dead_tiers]
        if not hbm:
            raise UnknownBlockError("the pool has no live HBM tier")

        def load(info: TierInfo) -> int:
            return sum(
                s.full_nbytes
                for s in self.registry.specs.values()
                if self.registry.models[s.model].home_hbm == info.tier_id
            ) - (info.spec.capacity_bytes or 0)

        return min(hbm, key=load).tier_id

    def rehome_dead(self) -> None:
        """Models placed for a dead HBM tier are placed for a live one."""
        with self.lock:
            moved = [m for m in self.registry.models.values() if m.home_hbm in self.dead_tiers]
            for entry in moved:
                entry.home_hbm = self._least_loaded_hbm()
                self.record("fault", "", f"model {entry.name} re-placed for {entry.home_hbm}")
            if moved:
                self.registry._static = None
                self.policy_state = None
                meta = {m: e.home_hbm for m, e in self.registry.models.items()}
        if moved:
            self.call(self._storage_id(), "save_meta", meta)

    # -- the control loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        last_check = 0.0
        while not self.stopping.is_set():
            self.wake.wait(self.config.policy.tick_s)
            self.wake.clear()
            try:
                if self.now() - last_check > 1.0:
                    self._check_tiers()
                    self.rehome_dead()
                    last_check = self.now()
                self.run_step()
            except Exception:  # a failed phase is logged; the loop goes on (STYLE rule 4)
                log.exception("control step failed")
                self.counters["step_errors"] += 1

    def run_step(self) -> None:
        now = self.now()
        with self.lock:
            for lease in self.leases.expire(now):
                self.record("lease", lease.block_id, f"lease {lease.lease_id} expired")
            if not self.registry.specs:
                return
            models = self.registry.model_names()
            tel_positions = self.registry.idle_telemetry(now).layer_time_s.shape[1]
            telemetry = self.telemetry.drain(models, tel_positions, now)
            leased = self.leases.leased_blocks(now)
            if now < self.grace_until_s:
                leased = leased | self.registry.blocks_in_hbm()
            snapshot = self.registry.snapshot(
                telemetry,
                leased=leased,
                demand=self.demand,
                last_use_s=self.last_use,
            )
            if self.policy_state is None:
                self.policy_state = initial_state(snapshot, self.config.policy)
            plan, self.policy_state = step(snapshot, self.policy_state, self.config.policy)
            self.last_plan_metrics = plan.metrics
            self.last_plan = plan
            self.counters["steps"] += 1
        for rejection in plan.rejections:
            self.counters[f"veto:{rejection.rule.value}"] += 1
            self.record("rejection", rejection.block_id, str(rejection))
        rows = plan.transition_rows
        encodings = self.registry.encodings
        for i in range(len(rows.block)):
            block_id = plan.block_ids[int(rows.block[i])]
            target = int(rows.target_encoding[i])
            self.executor.submit(
                block_id,
                None if target < 0 else encodings[target],
                int(rows.fallback_level[i]),
                STATE_CODES[int(rows.to_state[i])].value,
                int(rows.reason[i]),
            )

    # -- leases -----------------------------------------------------------------------------------

    def acquire(
        self, holder: str, block_ids: list[str], device: str | None, timeout_s: float = 30.0
    ) -> list[Grant | Miss]:
        """Leases on usable copies of ``block_ids`` for ``holder`` running on HBM tier
        ``device``. A block with no HBM copy becomes a demand promotion; the call waits up to
        ``timeout_s`` for it, then returns a :class:`Miss` naming the nearest copy."""
        for block_id in block_ids:
            self.registry.spec(block_id)  # raises UnknownBlockError, nothing changed
        results: dict[str, Grant | Miss] = {}
        deadline = self.now() + timeout_s
        waiting = list(block_ids)
        first = True
        while waiting:
            still = []
            for block_id in waiting:
                grant = self._try_grant(holder, block_id, device)
                if grant is not None:
                    results[block_id] = grant
                    self.counters[
                        "lease_grants_resident" if first else "lease_grants_after_miss"
                    ] += 1
                else:
                    still.append(block_id)
            waiting = still
            if not waiting:
                break
            if first:
                self.counters["lease_misses"] += len(waiting)
            first = False
            remaining = deadline - self.now()
            if remaining <= 0:
                break
            events = []
            with self.lock:
                for block_id in waiting:
                    self.demand[block_id] = self.demand.get(block_id, 0) + 1
                    events.append(self.ready_events.setdefault(block_id, threading.Event()))
            self.wake.set()
            events[0].wait(min(remaining, 0.05))
            with self.lock:
                for block_id in waiting:
                    count = self.demand.get(block_id, 0) - 1
                    if count > 0:
                        self.demand[block_id] = count
                    else:
                        self.demand.pop(block_id, None)
        for block_id in waiting:
            results[block_id] = self._nearest(block_id)
        return [results[b] for b in block_ids]

    def _try_grant(self, holder: str, block_id: str, device: str | None) -> Grant | None:
        now = self.now()
        with self.lock:
            hbm = [
                c
                for c in self.registry.copies_of(block_id)
                if c.status is CopyStatus.READY
                and self.registry.tiers[c.tier_id].kind is TierKind.HBM
                and c.tier_id not in self.dead_tiers
            ]
            if not hbm:
                return None
            hbm.sort(key=lambda c: (c.tier_id != device, c.tier_id))
            chosen = hbm[0]
            key = (block_id, chosen.tier_id, chosen.encoding)
            handle = self.executor.handles.get(key)
        if handle is None:  # a copy adopted after a restart: ask its tier for the reference
            try:
                handle = self.call(chosen.tier_id, "handle", block_id, chosen.encoding)[0]
            except Exception:
                return None
        with self.lock:
            current = self.registry.copy(*key)
            if current is None or current.status is not CopyStatus.READY:
                return None  # dropped or evicting meanwhile: never lease a copy on its way out
            self.executor.handles[key] = handle
            lease = self.leases.grant(
                holder, block_id, chosen.tier_id, chosen.encoding, chosen.epoch, now
            )
            self.last_use[block_id] = now
            spec = self.registry.spec(block_id)
        self.record("lease", block_id, f"lease {lease.lease_id} to {holder} on {chosen.tier_id}")
        return Grant(
            lease,
            [handle],
            spec,
            TierKind.HBM.value,
            device is not None and chosen.tier_id != device,
            self.config.lease_ttl_s,
        )

    def _nearest(self, block_id: str) -> Miss:
        with self.lock:
            ready = [c for c in self.registry.copies_of(block_id) if c.status is CopyStatus.READY]
        order = {TierKind.HBM: 0, TierKind.HOST: 1, TierKind.CXL: 2, TierKind.STORAGE: 3}
        ready.sort(key=lambda c: order[self.registry.tiers[c.tier_id].kind])
        if not ready:
            storage = self._storage_id()
            return Miss(block_id, storage, FULL, "no ready copy yet (being imported or rebuilt)")
        best = ready[0]
        return Miss(block_id, best.tier_id, best.encoding, "not resident in HBM by the deadline")

    def renew(self, leases: list[Lease]) -> list[Lease | None]:
        """Renew leases; a lease unknown to this controller (granted before a restart) is
        adopted if its copy still exists at its epoch; otherwise ``None`` (fenced)."""
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
                if renewed is None:
                    self.counters["lease_fenced"] += 1
        return out

    def copy_lost(self, lease: Lease) -> None:
        """A holder could not map the copy its lease names (its owner died): forget the copy,
        revoke the leases on it, and check the tier at once."""
        with self.lock:
            copy = self.registry.copy(lease.block_id, lease.tier_id, lease.encoding)
            if copy is not None and copy.epoch == lease.epoch:
                self.registry.remove_copy(lease.block_id, lease.tier_id, lease.encoding)
                self.executor.handles.pop((lease.block_id, lease.tier_id, lease.encoding), None)
            revoked = self.leases.revoke_copy(lease.block_id, lease.tier_id, lease.encoding)
            self.incarnations.pop(lease.tier_id, None)  # the next check reconciles the tier
        self.record(
            "fault", lease.block_id, f"copy on {lease.tier_id} lost: {len(revoked)} leases revoked"
        )
        self.wake.set()

    def release(self, leases: list[Lease]) -> int:
        with self.lock:
            return self.leases.release(leases)

    # -- telemetry, queries -----------------------------------------------------------------------

    def report_telemetry(self, batch: TelemetryBatch) -> None:
        with self.lock:
            self.telemetry.add(batch)
            self.counters["cache_hits"] += batch.cache_hits
            self.counters["cache_misses"] += batch.cache_misses
            self.counters["stall_us"] += int(batch.stall_s * 1e6)
        if batch.routes or batch.positions:
            self.wake.set()

    def block_state(self, block_id: str, device: str | None = None) -> str:
        with self.lock:
            copies = [
                Copy(
                    c.tier_id,
                    self.registry.tiers[c.tier_id].kind,
                    c.encoding,
                    PoolCopyStatus.IN_FLIGHT
                    if c.status is CopyStatus.IN_FLIGHT
                    else PoolCopyStatus.READY,
                    self.registry.tiers[c.tier_id].spec.device,
                )
                for c in self.registry.copies_of(block_id)
                if self.registry.tiers[c.tier_id].kind is not TierKind.HBM
                or device is None
                or c.tier_id == device
                or c.status is CopyStatus.READY
            ]
        home = device or self.registry.home_of(block_id).tier_id
        local = [c for c in copies if c.tier_kind is not TierKind.HBM or c.tier_id == home]
        peers = [
            Copy(c.tier_id, TierKind.HOST, c.encoding, c.status)
            for c in copies
            if c.tier_kind is TierKind.HBM
            and c.tier_id != home
            and c.status is PoolCopyStatus.READY
        ]
        return derive_state(local + peers).value

    def status(self) -> dict[str, Any]:
        refs = {t: h.report.remote() for t, h in self.handles.items() if t not in self.dead_tiers}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=5.0)
        reports: dict[str, Any] = dict.fromkeys(self.handles)
        for tier_id, ref in refs.items():
            try:
                reports[tier_id] = ray.get(ref, timeout=0)
            except Exception:
                reports[tier_id] = None
        with self.lock:
            states = Counter(self.block_state(b) for b in self.registry.specs)
            metrics = self.last_plan_metrics
            return {
                "tiers": reports,
                "dead_tiers": sorted(self.dead_tiers),
                "blocks": len(self.registry.specs),
                "models": {m: e.home_hbm for m, e in self.registry.models.items()},
                "states": dict(states),
                "leases": len(self.leases.leases),
                "counters": dict(self.counters),
                "quality_cost": None if metrics is None else metrics.quality_cost,
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
        """Differences between the registry and the tier inventories (empty when they agree)."""
        problems = []
        for tier_id in self.handles:
            if tier_id in self.dead_tiers:
                continue
            held = {(c.block_id, c.encoding) for c in self.call(tier_id, "inventory")}
            with self.lock:
                known = {
                    (c.block_id, c.encoding)
                    for c in self.registry.copies_on(tier_id)
                    if c.status is not CopyStatus.IN_FLIGHT
                }
            for block_id, enc in sorted(held - known, key=str):
                problems.append(f"{tier_id}: holds {block_id}@{enc.name}, registry does not know")
            for block_id, enc in sorted(known - held, key=str):
                problems.append(f"{tier_id}: registry lists {block_id}@{enc.name}, tier lacks it")
        return problems

    def describe(self) -> tuple[PoolConfig, list[TierInfo]]:
        return self.config, list(self.registry.tiers.values())

    def idle(self) -> bool:
        """No transfer in flight or queued."""
        return self.executor.idle()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()


HBM_LEVEL = HBM  # re-exported for the executor
