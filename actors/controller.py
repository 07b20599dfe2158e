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
from typing import Any

import ray

from actors.admin_ops import AdminOps
from actors.config import PoolConfig
from actors.executor import Executor
from actors.granting import LeaseService
from actors.leases import LeaseTable
from actors.names import tier_actor_name
from actors.queries import AuditRecord, PoolQueries
from actors.regen_ops import RegenOps
from actors.registry import Registry, TierInfo
from actors.telemetry import TelemetryBatch, TelemetryBuffer
from actors.topology import alive_nodes, create_tier_actor, plan_tiers
from policy.plan import REASONS, STATE_CODES
from policy.state import initial_state
from policy.step import step
from pool.blocks import BlockSpec
from pool.errors import DuplicateBlockError, UnknownBlockError
from pool.regen import LowRankDelta, Tied
from pool.tiers import TierKind

log = logging.getLogger(__name__)


class PlacementController(LeaseService, PoolQueries, AdminOps, RegenOps):
    """The controller actor (see the module docstring); leases in :mod:`actors.granting`,
    read-only views in :mod:`actors.queries`, admin goals and views in :mod:`actors.admin_ops`."""

    def __init__(self, config: PoolConfig, tiers: list[TierInfo]):
        self.config = config
        self.lock = threading.RLock()
        self.registry = Registry(encodings=config.parsed_encodings)
        self.handles: dict[str, Any] = {}
        missing = []
        for info in tiers:
            self.registry.add_tier(info)
            try:
                self.handles[info.tier_id] = ray.get_actor(
                    tier_actor_name(info.tier_id), namespace=config.namespace
                )
            except ValueError:  # its node was removed while this controller was away
                self.registry.set_dead(info.tier_id, True)
                missing.append(info.tier_id)
        self.incarnations: dict[str, str] = {}
        self.leases = LeaseTable(config.lease_ttl_s)
        self.audit_log: deque[AuditRecord] = deque(maxlen=config.audit_log_size)
        self.counters: Counter[str] = Counter()
        self.counter_lock = threading.Lock()
        self.copies_changed = threading.Condition(self.lock)  # a copy became ready
        self.telemetry = TelemetryBuffer()
        self.demand: dict[str, int] = {}
        self.last_use: dict[str, float] = {}
        self.policy_state: Any = None
        self.last_plan: Any = None
        self.executor = Executor(self, ThreadPoolExecutor(config.transfer_threads))
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.init_goals()
        self.init_recipes()
        # Holders of leases granted by a previous instance renew within one TTL; until then
        # every HBM copy counts as pinned (DESIGN section 4: a leased copy is never dropped).
        self.grace_until_s = 0.0
        for tier_id in missing:
            self.record("fault", "", f"tier {tier_id}: no actor (its node is gone)")
        self._recover()
        if self.registry.blocks_in_hbm():  # a restart: HBM copies outlived the last instance
            self.grace_until_s = self.now() + config.lease_ttl_s
        self.loop_thread = threading.Thread(target=self._loop, name="control-loop", daemon=True)
        self.loop_thread.start()

    # -- clock and audit --------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic()

    def count(self, key: str, n: int = 1) -> None:
        """Add to a counter (from any thread: Counter's ``+=`` alone can lose updates)."""
        if n:
            with self.counter_lock:
                self.counters[key] += n

    def counter_values(self) -> dict[str, int]:
        with self.counter_lock:
            return dict(self.counters)

    def record(self, kind: str, block_id: str, detail: str) -> None:
        self.audit_log.append(AuditRecord(time.time(), kind, block_id, detail))

    def call(self, tier_id: str, method: str, *args: Any) -> Any:
        """A blocking call to a tier actor with the configured timeout; a dead actor is handled
        (its copies forgotten, leases on them revoked) before the error is raised again."""
        handle = self.handles.get(tier_id)
        if handle is None:
            raise ray.exceptions.ActorUnavailableError(f"tier {tier_id} has no actor", None)
        try:
            return ray.get(
                getattr(handle, method).remote(*args),
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
        self.count("tier_faults")
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
        self.restore_recipes(storage)
        self._check_tiers()  # no tier is known yet: every inventory is reconciled

    def _check_tiers(self) -> None:
        """Detect restarted (emptied) and dead tier actors; reconcile the restarted ones."""
        refs = {t: h.report.remote() for t, h in self.handles.items()}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=5.0)
        for tier_id, ref in refs.items():
            try:
                report = ray.get(ref, timeout=0)
            except Exception as err:
                with self.lock:
                    newly_dead = self.registry.set_dead(tier_id, True)
                if newly_dead:
                    self.tier_failed(tier_id, err)
                continue
            with self.lock:
                self.registry.set_dead(tier_id, False)
                if report.shares_copies:
                    self.registry.sharing.add(tier_id)
                else:
                    self.registry.sharing.discard(tier_id)
            if self.incarnations.get(tier_id) != report.incarnation:
                self._reconcile(tier_id, report.incarnation)

    def _reconcile(self, tier_id: str, incarnation: str) -> None:
        """Take a (re)started tier's inventory as the truth; revoke leases on copies it lost."""
        inventory = self.call(tier_id, "inventory")
        with self.lock:
            forgotten, adopted = self.registry.reconcile(tier_id, inventory, self.now())
            restarted = self.incarnations.get(tier_id) is not None
            self.incarnations[tier_id] = incarnation
            revoked = sum(
                len(self.leases.revoke_copy(c.block_id, tier_id, c.encoding)) for c in forgotten
            )
        if forgotten or revoked or restarted:
            self.record(
                "fault",
                "",
                f"tier {tier_id} reconciled: {len(forgotten)} copies forgotten, {adopted} "
                f"adopted, {revoked} leases revoked",
            )

    # -- models -----------------------------------------------------------------------------------

    def register_model(
        self,
        model: str,
        specs: list[BlockSpec],
        home_hbm: str | None,
        recipes: dict[str, Tied | LowRankDelta] | None = None,
    ) -> str:
        """Register an imported model's blocks, placed for ``home_hbm`` (default: the live HBM
        tier with the most capacity left after the models already placed), the blocks named in
        ``recipes`` REGENERABLE by them. Returns the home.

        Raises:
            SpecError, UnknownBlockError: a recipe does not fit (nothing registered).
        """
        self.check_new_model(model, home_hbm)
        storage = self._storage_id()
        inventory = self.call(storage, "inventory")
        with self.lock:  # the blocks and their storage copies appear to the loop together
            if home_hbm is None:
                home_hbm = self._least_loaded_hbm()
            self.registry.add_model(model, specs, home_hbm, recipes)
            self.registry.reconcile(storage, inventory, self.now())
            self.policy_state = None  # the model set changed: the policy's arrays are resized
            meta = {m: e.home_hbm for m, e in self.registry.models.items()}
        self.call(storage, "save_meta", meta)
        if recipes:
            self.save_recipes()
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
            hbm = [t.tier_id for t in self.registry.tiers_of(TierKind.HBM, live=True)]
            if home_hbm is not None and home_hbm not in hbm:
                raise UnknownBlockError(
                    f"home tier {home_hbm!r} is not a live HBM tier of this pool; live HBM "
                    f"tiers: {hbm}"
                )

    def _least_loaded_hbm(self) -> str:
        hbm = self.registry.tiers_of(TierKind.HBM, live=True)
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
            moved = [m for m in self.registry.models.values() if m.home_hbm in self.registry.dead]
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

    def adopt_new_nodes(self) -> list[str]:
        """Tiers for the nodes that joined since the pool (or this controller) started, by the
        rule of :func:`actors.topology.plan_tiers`: their actors are created (or found, after a
        controller restart) and registered; the next health check reconciles their inventories.
        Never adds a storage tier. Returns the new tier ids."""
        planned = [
            t for t in plan_tiers(alive_nodes(), self.config) if t.kind is not TierKind.STORAGE
        ]
        with self.lock:
            new = [t for t in planned if t.tier_id not in self.registry.tiers]
        added = []
        for info in new:
            try:
                handle = create_tier_actor(info, self.config, ())
                ray.get(handle.ping.remote(), timeout=self.config.call_timeout_s)
            except Exception as err:  # the node went away again, or is not ready: next scan
                self.record("fault", "", f"tier {info.tier_id} for a new node: {err}")
                continue
            with self.lock:
                self.registry.add_tier(info)
                # Copy on write: readers iterate the handles without the lock.
                self.handles = {**self.handles, info.tier_id: handle}
                self.policy_state = None  # the tier set changed: the policy's arrays are resized
            added.append(info.tier_id)
            self.count("tiers_added")
            self.record("execute", "", f"tier {info.tier_id} added: node {info.node_id[:8]} joined")
        if added:
            self.wake.set()
        return added

    def _loop(self) -> None:
        last_check = last_scan = 0.0
        while not self.stopping.is_set():
            self.wake.wait(self.config.policy.tick_s)
            self.wake.clear()
            try:
                if self.now() - last_scan > self.config.node_scan_s:
                    last_scan = self.now()
                    self.adopt_new_nodes()
                if self.now() - last_check > 1.0:
                    self._check_tiers()
                    self.rehome_dead()
                    last_check = self.now()
                self.run_step()
            except Exception:  # a failed phase is logged; the loop goes on (STYLE rule 4)
                log.exception("control step failed")
                self.count("step_errors")

    def run_step(self) -> None:
        started = time.perf_counter()
        self.reconcile_goals()  # admin goals (drains) move the world first
        now = self.now()
        with self.lock:
            for lease in self.leases.expire(now):
                self.record("lease", lease.block_id, f"lease {lease.lease_id} expired")
            if not self.registry.specs:
                return
            telemetry = self.telemetry.drain(
                self.registry.model_names(), self.registry.positions(), now
            )
            leased = self.leases.pinned_blocks(now)  # recallable leases: recall_for_plan
            if now < self.grace_until_s:
                leased = leased | self.registry.blocks_in_hbm()
            snapshot = self.registry.snapshot(
                telemetry,
                leased=leased,
                demand=self.demand,
                last_use_s=self.last_use,
            )
            snapshot = self.goal_snapshot(snapshot)  # admin goals (pins) as the step sees them
            if self.policy_state is None:
                self.policy_state = initial_state(snapshot, self.config.policy)
            plan, self.policy_state = step(snapshot, self.policy_state, self.config.policy)
            self.last_plan = plan
        self.count("steps")
        for phase, ms in plan.metrics.phase_ms.items():
            self.count(f"phase_us:{phase}", int(ms * 1e3))
        for rejection in plan.rejections:
            self.count(f"veto:{rejection.rule.value}")
            self.record("rejection", rejection.block_id, str(rejection))
        rows = plan.transition_rows
        encodings = self.registry.encodings
        held, reshares = self.recall_for_plan(plan)  # moves of copies that leases pin wait
        for i in self._submission_order(plan):
            if i in held:
                continue
            block_id = plan.block_ids[int(rows.block[i])]
            target = int(rows.target_encoding[i])
            self.executor.submit(
                block_id,
                None if target < 0 else encodings[target],
                int(rows.fallback_level[i]),
                STATE_CODES[int(rows.to_state[i])].value,
                REASONS[int(rows.reason[i])],
            )
        for key in reshares:  # tied blocks' other bytes that can share their source's now
            self.executor.submit_reshare(*key)
        self.count("step_us", int((time.perf_counter() - started) * 1e6))

    def _submission_order(self, plan: Any) -> list[int]:
        """The plan's transitions in the order they are handed to the executor's threads:
        evictions first (their drops make the room promotions need), tied blocks last (they
        share the copy their source's transition makes), the plan's order otherwise."""
        rows = plan.transition_rows
        with self.lock:
            recipes = self.registry.recipes

            def rank(i: int) -> int:
                if int(rows.target_encoding[i]) < 0:
                    return 0
                block_id = plan.block_ids[int(rows.block[i])]
                return 2 if isinstance(recipes.get(block_id), Tied) else 1

            return sorted(range(len(rows.block)), key=rank)

    # -- leases -----------------------------------------------------------------------------------

    # -- telemetry, queries -----------------------------------------------------------------------

    def report_telemetry(self, batch: TelemetryBatch) -> None:
        with self.lock:
            self.telemetry.add(batch)
        self.count("cache_hits", batch.cache_hits)
        self.count("cache_misses", batch.cache_misses)
        self.count("stall_us", int(batch.stall_s * 1e6))
        self.count("telemetry_layer_times", len(batch.layer_times))
        self.count("telemetry_routes", len(batch.routes))
        if batch.routes or batch.positions:
            self.wake.set()

    def describe(self) -> tuple[PoolConfig, list[TierInfo]]:
        return self.config, list(self.registry.tiers.values())

    def idle(self) -> bool:
        """No transfer in flight or queued."""
        return self.executor.idle()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
