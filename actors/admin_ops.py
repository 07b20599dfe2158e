"""The controller's admin operations: goals (pins, drains, the policy), set by the admin API
(``api/admin.py``) and carried out by the control loop; the views are in ``actors.admin_views``.

A mixin of :class:`actors.controller.PlacementController`. An admin call records a goal and
returns; the control loop carries it out, every step, until it holds (STYLE rule 4):

- **pin** a block: keep it resident in its home HBM at full precision. The step sees a pinned
  block with a full-precision floor and, until it is resident that way, as demanded (it is
  promoted first, making room); once resident, as leased (untouchable: never evicted or
  re-encoded, whatever the pressure). Unpinning removes the goal; the policy decides again.
- **drain** a tier (HBM, HOST or CXL; never STORAGE, the source of truth): nothing new is placed
  there (the registry leaves it out of placement), models placed for a drained HBM tier are placed
  for another, and every copy on it is dropped, a copy under a live lease once its lease ends.
  Undraining lets placement use the tier again; nothing is moved back on purpose.
- **policy**: a validated :class:`PolicyConfig` replaces the one the step uses, from the next step.

Goals are audited (kind ``goal``) when set, cleared and reached. They live in the controller's
memory: a restarted controller starts without them, with the policy it was created with.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.admin_views import AdminViews, DrainGoal, PinGoal, UnknownIdError
from actors.config import PoolConfig
from actors.registry import CopyEntry, CopyStatus
from policy.config import PolicyConfig
from policy.snapshot import Snapshot
from pool.errors import UnknownBlockError, WeightpoolError
from pool.tiers import TierKind

if TYPE_CHECKING:
    from actors.executor import Executor

MAX_TICK_S = 60.0  # the loop must wake at least this often (a longer wait overflows on some OSes)
# Fields of the policy that shape its carried state (initial_state): changing one restarts it.
STATE_SHAPING_FIELDS = (
    "default_layer_time_s",
    "coactivation_max_experts",
    "coactivation_max_bytes",
)

__all__ = ["AdminOps", "GoalConflictError", "PolicyValueError", "UnknownIdError", "check_policy"]


class GoalConflictError(WeightpoolError):
    """A goal that cannot be carried out as asked (the message says why); nothing was changed."""


class PolicyValueError(WeightpoolError, ValueError):
    """A policy value the controller refuses; ``field`` and ``value`` name it."""

    def __init__(self, field: str, value: Any, expected: str):
        super().__init__(f"policy field {field!r}: got {value!r}; expected {expected}")
        self.field = field
        self.value = value


def check_policy(policy: PolicyConfig) -> None:
    """What the controller needs beyond :class:`PolicyConfig`'s own ranges: finite numbers and a
    loop that wakes at least every ``MAX_TICK_S``.

    Raises:
        PolicyValueError: naming the first bad field and its value.
    """
    for name, value in policy.model_dump().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise PolicyValueError(name, value, "a finite number")
    if policy.tick_s > MAX_TICK_S:
        raise PolicyValueError("tick_s", policy.tick_s, f"at most {MAX_TICK_S} s")


class AdminOps(AdminViews):
    # Provided by the controller.
    config: PoolConfig
    executor: Executor
    policy_state: Any
    wake: threading.Event

    if TYPE_CHECKING:

        def count(self, key: str, n: int = 1) -> None: ...
        def record(self, kind: str, block_id: str, detail: str) -> None: ...
        def call(self, tier_id: str, method: str, *args: Any) -> Any: ...
        def _least_loaded_hbm(self) -> str: ...

    def init_goals(self) -> None:
        """Called once by the controller's constructor."""
        self.pins: dict[str, PinGoal] = {}
        self.drains: dict[str, DrainGoal] = {}
        self._row_of: tuple[tuple[str, ...], dict[str, int]] = ((), {})
        self._pinned_arrays: tuple[Any, ...] = ()  # (floor in, sensitivity in, pins, outs...)

    # -- goals: pins ------------------------------------------------------------------------------

    def pin(self, block_id: str) -> PinGoal:
        """Record the goal "keep ``block_id`` in its home HBM at full precision" (idempotent).

        Raises:
            UnknownIdError: no such block.
            GoalConflictError: the pinned blocks of its home tier would not fit in its HBM.
        """
        with self.lock:
            spec = self._spec(block_id)
            if block_id in self.pins:
                return self.pins[block_id]
            home = self.registry.home_of(block_id)
            capacity = home.spec.capacity_bytes or 0
            usable = int(capacity * (1.0 - self.config.policy.hbm_headroom_fraction))
            pinned = sum(
                self.registry.specs[b].full_nbytes
                for b in self.pins
                if self.registry.home_of(b).tier_id == home.tier_id
            )
            if pinned + spec.full_nbytes > usable:
                raise GoalConflictError(
                    f"cannot pin {block_id!r}: its {spec.full_nbytes} bytes at full precision and "
                    f"the {pinned} bytes already pinned on {home.tier_id} exceed the {usable} "
                    "bytes that tier's HBM offers (capacity less headroom)"
                )
            goal = self.pins[block_id] = PinGoal(block_id, time.time())
        self.record("goal", block_id, f"pin: keep in HBM ({home.tier_id}) at full precision")
        self.wake.set()
        return goal

    def unpin(self, block_id: str) -> bool:
        """Remove the pin goal; False if the block was not pinned.

        Raises:
            UnknownIdError: no such block.
        """
        with self.lock:
            self._spec(block_id)
            removed = self.pins.pop(block_id, None)
        if removed is not None:
            self.record("goal", block_id, "unpin: the policy places it again")
            self.wake.set()
        return removed is not None

    # -- goals: drains ----------------------------------------------------------------------------

    def drain(self, tier_id: str) -> DrainGoal:
        """Record the goal "move every copy off ``tier_id``, place nothing new there"
        (idempotent).

        Raises:
            UnknownIdError: no such tier.
            GoalConflictError: a STORAGE tier, or the last HBM tier able to hold models.
        """
        with self.lock:
            info = self._tier(tier_id)
            if tier_id in self.drains:
                return self.drains[tier_id]
            if info.kind is TierKind.STORAGE:
                raise GoalConflictError(
                    f"tier {tier_id!r} is the storage tier (the source of truth): it cannot be "
                    "drained; drain HBM, HOST or CXL tiers"
                )
            others = [
                t.tier_id
                for t in self.registry.tiers_of(info.kind, live=True)
                if t.tier_id != tier_id
            ]
            if info.kind is TierKind.HBM and not others:
                raise GoalConflictError(
                    f"cannot drain {tier_id!r}: no other live HBM tier could take its models"
                )
            goal = self.drains[tier_id] = DrainGoal(tier_id, time.time())
            self.registry.draining.add(tier_id)
            self.registry._static = None  # placement leaves the tier out from the next step
        self.record("goal", "", f"drain {tier_id}: move every copy off, place nothing new there")
        self.wake.set()
        return goal

    def undrain(self, tier_id: str) -> bool:
        """Remove the drain goal; False if the tier was not draining.

        Raises:
            UnknownIdError: no such tier.
        """
        with self.lock:
            self._tier(tier_id)
            removed = self.drains.pop(tier_id, None)
            if removed is not None:
                self.registry.draining.discard(tier_id)
                self.registry._static = None
        if removed is not None:
            self.record("goal", "", f"undrain {tier_id}: placement may use it again")
            self.wake.set()
        return removed is not None

    # -- goals: the policy ------------------------------------------------------------------------

    def policy(self) -> PolicyConfig:
        return self.config.policy

    def set_policy(self, policy: PolicyConfig | dict[str, Any]) -> PolicyConfig:
        """Replace the policy the step uses (from the next step). Returns it.

        Raises:
            pydantic.ValidationError: ``policy`` is a dict that is not a valid PolicyConfig.
            PolicyValueError: a value the controller refuses (:func:`check_policy`).
        """
        policy = PolicyConfig.model_validate(policy)
        check_policy(policy)
        with self.lock:
            old = self.config.policy
            self.config = self.config.model_copy(update={"policy": policy})
            if any(getattr(old, f) != getattr(policy, f) for f in STATE_SHAPING_FIELDS):
                self.policy_state = None
        changed = [
            f"{name} {getattr(old, name)!r} -> {value!r}"
            for name, value in policy.model_dump().items()
            if getattr(old, name) != value
        ]
        if changed:
            self.record("goal", "", "policy: " + ", ".join(changed))
            self.wake.set()
        return policy

    # -- the loop's side of goals -----------------------------------------------------------------

    def reconcile_goals(self) -> None:
        """Move the world toward the goals (called by the loop before each step, without the
        lock held): re-place models, drop copies left on drained tiers; note goals reached."""
        if not self.drains and not self.pins:
            return
        with self.lock:
            for block_id, pin in list(self.pins.items()):
                if pin.reached_s is None and self.pin_satisfied(block_id):
                    self.pins[block_id] = dataclasses.replace(pin, reached_s=time.time())
                    self.record("goal", block_id, "pin: resident in HBM at full precision")
            moved = []
            for entry in self.registry.models.values():
                if entry.home_hbm in self.drains:
                    try:
                        new_home = self._least_loaded_hbm()
                    except UnknownBlockError:
                        continue  # no live HBM tier left: the drain waits (its progress shows it)
                    moved.append((entry.name, entry.home_hbm, new_home))
                    entry.home_hbm = new_home
            if moved:
                self.registry._static = None
                self.policy_state = None
                meta = {m: e.home_hbm for m, e in self.registry.models.items()}
            now = self.now()
            drops = [
                c
                for tier_id in self.drains
                for c in self.registry.copies_on(tier_id)
                if c.status is CopyStatus.READY
                and self.registry.home_of(c.block_id).tier_id != tier_id
                and not self.leases.pins(c.block_id, tier_id, c.encoding, now)
            ]
            finished = [
                g
                for g in self.drains.values()
                if g.done_s is None and not self.registry.copies_on(g.tier_id)
            ]
            for goal in finished:  # recorded under the lock: never seen done before it is
                self.drains[goal.tier_id] = dataclasses.replace(goal, done_s=time.time())
                self.record("goal", "", f"drain {goal.tier_id}: complete, no copy left")
        for model, old, new in moved:
            self.record("goal", "", f"drain {old}: model {model} re-placed for {new}")
        if moved:
            self.call(self.registry.storage_tier().tier_id, "save_meta", meta)
        for copy in drops:
            self._submit_drop(copy)

    def _submit_drop(self, copy: CopyEntry) -> None:
        """Drop one copy on the executor's threads, unless its block has a chain queued."""
        ex = self.executor
        with ex.lock:
            if copy.block_id in ex.busy:
                return
            ex.busy.add(copy.block_id)
            ex.queued += 1

        def run() -> None:
            try:
                if ex._drop(copy):
                    where = f"{copy.tier_id}@{copy.encoding.name}"
                    self.record("execute", copy.block_id, f"drain: dropped {where}")
            except Exception as err:
                self.count("execute_errors")
                self.record("fault", copy.block_id, f"drain drop failed: {err!r}")
            finally:
                with ex.lock:
                    ex.busy.discard(copy.block_id)
                    ex.queued -= 1

        pool: ThreadPoolExecutor = ex.pool
        pool.submit(run)

    def goal_snapshot(self, snapshot: Snapshot) -> Snapshot:
        """The step's view of the pin goals (called under the lock): pinned blocks may only be
        at full precision; one resident that way is leased (untouchable), one that is not is
        demanded (promoted first)."""
        if not self.pins:
            return snapshot
        b = snapshot.blocks
        if self._row_of[0] is not b.block_ids:
            self._row_of = (b.block_ids, {x: i for i, x in enumerate(b.block_ids)})
        index = self._row_of[1]
        rows = np.array(sorted(index[x] for x in self.pins if x in index), np.int64)
        resident = b.hbm_encoding[rows] == 0  # encodings[0] is FULL (PoolConfig checks it)
        leased = b.leased.copy()
        leased[rows[resident]] = True
        demand = b.demand.copy()
        demand[rows[~resident]] = True
        floor, sensitivity = self._pinned_quality(snapshot, rows)
        blocks = dataclasses.replace(
            b, leased=leased, demand=demand, floor_bits=floor, sensitivity=sensitivity
        )
        return dataclasses.replace(snapshot, blocks=blocks)

    def _pinned_quality(self, snapshot: Snapshot, rows: np.ndarray) -> tuple[Any, Any]:
        """Floors and sensitivities with only plain full precision allowed for ``rows``. Kept
        while neither the inputs nor the pins change: the policy caches what it derives from
        these arrays by their identity (``policy.static``)."""
        b = snapshot.blocks
        cached = self._pinned_arrays
        if (
            cached
            and cached[0] is b.floor_bits
            and cached[1] is b.sensitivity
            and np.array_equal(cached[2], rows)
        ):
            return cached[3], cached[4]
        floor = b.floor_bits.copy()
        floor[rows] = snapshot.encodings.bits[0]
        sensitivity = b.sensitivity.copy()
        sensitivity[rows[:, None], np.arange(1, sensitivity.shape[1])[None, :]] = np.inf
        self._pinned_arrays = (b.floor_bits, b.sensitivity, rows, floor, sensitivity)
        return floor, sensitivity
