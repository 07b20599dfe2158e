"""weightpool's control step (``policy.step``) driving the simulator.

Every ``positions_per_step`` schedule positions, the adapter builds a snapshot of the simulator's
state (what is in HBM, at which encoding, what is in flight), with the telemetry revealed so far
(router choices of the positions already run, each position's measured wall time, stall
included, as a client measures it), runs one step, and carries
out the plan: fetches become link transfers in the plan's class and order, evictions free HBM,
a re-encode in HBM is carried out as a fetch of the new encoding (the simulator models one
link only, so this charges it to the host link). Misses between steps are fetched on demand at
the last plan's ``demand_encoding`` for the block (its target where the plan has one; else the
encoding the step would promote it at if it were demanded: see ``policy.plan.Plan``); room is
made by evicting the resident blocks of lowest value density in the last plan, and among the
blocks it does not target (all of density 0) the one whose layer runs again last. Before serving
starts, the first step's targets are placed at no cost, as every peer places its initial set
(before, weightpool alone started from an empty HBM and filled it over the link: on qwen3 at
50 % HBM that cold start was about 0.8 ms of its 27.5 ms stall a token over 300 tokens).

With ``plan_misses`` (``--plan-misses``, the expensive reference), a position's misses first run
a step with those blocks flagged demand and their router choice revealed, as the placement
controller runs the step at once on a lease miss, and come at the target that step gives them
(full precision if it gives none). The replay charges no time for the step (a real controller
takes milliseconds a step at these sizes, longer than a stalled layer), and it costs a step per
position that misses, so it is off by default.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bench.replay.presets import Layout
from bench.replay.simulator import DEMAND, IMMINENT, PREFETCH, Simulator
from policy.builder import DEFAULT_ENCODINGS
from policy.config import PolicyConfig
from policy.plan import Plan, Priority
from policy.snapshot import (
    HBM,
    HOST,
    KIND_CODES,
    NONE,
    STORAGE,
    BlockArrays,
    EncodingTable,
    LinkModel,
    ModelShapes,
    Snapshot,
    Telemetry,
    TierArrays,
)
from policy.state import PolicyState, initial_state
from policy.step import step
from pool.blocks import BlockKind

_KINDS = {
    "dense": BlockKind.DENSE,
    "expert": BlockKind.EXPERT,
    "shared-expert": BlockKind.SHARED_EXPERT,
    "embedding": BlockKind.EMBEDDING,
    "head": BlockKind.HEAD,
}
_PRIORITY = {
    Priority.DEMAND: DEMAND,
    Priority.IMMINENT: IMMINENT,
    Priority.PREFETCH: PREFETCH,
    Priority.DEMOTION: PREFETCH,
}


class WeightpoolPolicy:
    name = "weightpool"

    def __init__(
        self,
        config: PolicyConfig,
        floor_bits: np.ndarray,
        positions_per_step: int = 16,
        precision: bool = True,
        plan_misses: bool = False,
    ):
        self.config = config
        self.floor_bits = floor_bits
        self.every = positions_per_step
        self.precision = precision  # False: placement only (full precision)
        self.plan_misses = plan_misses
        self._miss_at = (-1, -1)  # the position whose misses were last planned
        self._headroom = 0.0  # the quality budget the last plan left to demands (see encoding)
        self.plan: Plan | None = None
        self.state: PolicyState | None = None
        self.snapshot: Snapshot | None = None
        self.layer_time = np.zeros(1)
        self.revealed = (0, 0)  # (step, position) up to which routing was passed on
        self.position_start_s = 0.0

    # -- snapshot ----------------------------------------------------------------------------

    def setup(self, sim: Simulator) -> None:
        lay: Layout = sim.layout
        n = len(lay.block_names)
        sizes = sim.sizes
        encodings = DEFAULT_ENCODINGS
        decode = sim.decode_gbps.copy()
        sensitivity = sim.sensitivity.copy()
        if not self.precision:  # placement only: every reduced precision is off the table
            sensitivity[:, 1:] = np.inf
        hw = sim.hardware
        gbps = np.zeros((4, 4))
        latency = np.zeros((4, 4))
        gbps[HOST, HBM] = gbps[HBM, HOST] = hw.host_gbps
        gbps[STORAGE, HBM] = gbps[STORAGE, HOST] = hw.nvme_gbps
        gbps[HBM, HBM] = hw.host_gbps  # re-encodes are charged to the host link (see above)
        latency[HOST, HBM] = hw.transfer_latency_s
        full_total = int(sizes[:, 0].sum())
        tiers = TierArrays(
            ("hbm0", "host", "storage"),
            np.array([HBM, HOST, STORAGE], np.int8),
            np.array([sim.capacity, full_total, 1 << 62], np.int64),
            np.zeros(3, np.int64),
        )
        model = lay.model
        blocks = BlockArrays(
            block_ids=lay.block_names,
            model=np.zeros(n, np.int32),
            position=lay.position.astype(np.int32),
            kind=np.array([KIND_CODES[_KINDS[k]] for k in lay.kind], np.int8),
            expert=lay.expert.astype(np.int32),
            nbytes=sizes,
            sensitivity=sensitivity,
            floor_bits=self.floor_bits,
            leased=np.zeros(n, bool),
            demand=np.zeros(n, bool),
            last_use_s=np.zeros(n),
            hbm_encoding=sim.encoding.copy(),
            fallback_level=np.full(n, HOST, np.int64),
            in_flight_encoding=np.full(n, NONE, np.int64),
            placed_at_s=np.full(n, -1e9),
            regenerable=np.zeros(n, bool),
            hbm_tier=np.zeros(n, np.int64),
            host_tier=np.ones(n, np.int64),
            cxl_tier=np.full(n, NONE, np.int64),
        )
        positions = lay.positions
        # Experts are numbered by MoE layer in traces; the policy's state is by schedule layer.
        self.moe_to_layer = model.dense_layers
        self.layer_time = np.full(positions, np.nan)
        self.snapshot = Snapshot(
            EncodingTable(encodings, decode),
            blocks,
            tiers,
            LinkModel(gbps, latency),
            ModelShapes(
                np.array([positions], np.int32),
                np.array([model.layers], np.int32),
                np.array([model.experts], np.int32),
            ),
            Telemetry(
                0.0, np.full((1, positions), np.nan), np.zeros(1, np.int32), np.ones(1, np.int32)
            ),
        )
        self.state = initial_state(self.snapshot, self.config)
        self._step(sim, preload=True)

    def _routes(self, sim: Simulator, through: tuple[int, int]) -> tuple[np.ndarray, ...]:
        """Router choices revealed since the last call: the MoE positions before ``through``
        (a (step, position) pair)."""
        lay = sim.layout
        rows_step, rows_layer, rows_expert = [], [], []
        t, p = self.revealed
        while (t, p) < through:
            moe = lay.moe_layer_of_position(p)
            if moe >= 0:
                experts = sim.chosen[t][moe]
                rows_step.append(np.full(len(experts), t, np.int64))
                rows_layer.append(np.full(len(experts), moe + self.moe_to_layer, np.int32))
                rows_expert.append(experts.astype(np.int32))
            p += 1
            if p == lay.positions:
                t, p = t + 1, 0
        self.revealed = max(self.revealed, through)
        if not rows_step:
            return (
                np.zeros(0, np.int64),
                np.zeros(0, np.int32),
                np.zeros(0, np.int32),
                np.zeros(0, np.int32),
            )
        step_rows = np.concatenate(rows_step)
        return (
            step_rows,
            np.zeros(len(step_rows), np.int32),
            np.concatenate(rows_layer),
            np.concatenate(rows_expert),
        )

    def _step(self, sim: Simulator, demand: list[int] | None = None, preload: bool = False) -> None:
        """One control step on the simulator's state. ``demand``: blocks of the current
        position that missed (their router choice is revealed, and they are flagged demand);
        the plan then only says at which encoding they come (the rest of it waits for the next
        regular step). None: a regular step, whose plan is carried out. ``preload``: the first
        step, before serving starts; its targets are placed at no cost, as every peer places
        its initial set (``Simulator.preload``)."""
        assert self.snapshot is not None and self.state is not None
        through = (sim.step, sim.position)
        if demand is not None and sim.position + 1 < sim.layout.positions:
            through = (sim.step, sim.position + 1)  # this position's router has chosen
        route_step, route_model, route_layer, route_expert = self._routes(sim, through)
        in_flight = np.full(len(sim.encoding), NONE, np.int64)
        resident = sim.encoding.copy()
        flying = sim.in_flight()
        in_flight[flying] = resident[flying]
        resident[flying] = NONE
        telemetry = Telemetry(
            now_s=sim.now_s,
            layer_time_s=self.layer_time[None, :].copy(),
            current_position=np.array([sim.position], np.int32),
            concurrency=np.ones(1, np.int32),
            route_step=route_step,
            route_model=route_model,
            route_layer=route_layer,
            route_expert=route_expert,
        )
        self.layer_time[:] = np.nan
        demanded = np.zeros(len(resident), bool)
        if demand:
            demanded[demand] = True
        blocks = replace(
            self.snapshot.blocks,
            hbm_encoding=resident,
            in_flight_encoding=in_flight,
            demand=demanded,
        )
        self.snapshot = replace(self.snapshot, blocks=blocks, telemetry=telemetry)
        plan, self.state = step(self.snapshot, self.state, self.config)
        self.plan = plan
        m = plan.metrics
        self._headroom = max(m.quality_budget - m.quality_cost, 0.0)
        if preload:
            target = plan.target_hbm_encoding
            for block in np.flatnonzero(target != NONE).tolist():
                sim.preload(block, int(target[block]))
        elif demand is None:
            self._apply(sim, plan)

    def _apply(self, sim: Simulator, plan: Plan) -> None:
        protected = (
            set(sim.needed(sim.step, sim.position).tolist())
            if sim.step < len(sim.chosen)
            else set()
        )
        for row in np.flatnonzero(plan.transition_rows.target_encoding == NONE).tolist():
            block = int(plan.transition_rows.block[row])
            if sim.encoding_of[block] >= 0 and block not in protected and sim.evictable(block):
                sim.evict(block)
        moves = plan.transfer_rows  # in priority, then deadline, order (the schedule's)
        for row in np.flatnonzero(moves.destination_level == HBM).tolist():
            block = int(moves.block[row])
            encoding = int(moves.encoding[row])
            if sim.encoding_of[block] >= 0 and sim.encoding_of[block] != encoding:
                if block in protected or not sim.evictable(block):
                    continue
                sim.evict(block)  # a re-encode, carried out as a fetch of the new encoding
                ahead = False  # of a block already in HBM: not a prediction of its use
            else:
                ahead = True
            priority = _PRIORITY[Priority(int(moves.priority[row]))]
            sim.fetch(self, block, encoding, priority, protected | {block}, ahead)

    # -- simulator hooks ---------------------------------------------------------------------

    def before_position(self, sim: Simulator, step_index: int, position: int) -> None:
        self.position_start_s = sim.now_s
        if position % self.every == 0:
            self._step(sim)

    def during_position(
        self, sim: Simulator, step_index: int, position: int, needed: np.ndarray
    ) -> None:
        return None

    def after_position(
        self, sim: Simulator, step_index: int, position: int, needed: np.ndarray
    ) -> None:
        # What a client measures: the position's wall time, its stall included (with compute
        # alone, a stalled decode looked up to 40 times faster than it ran, and the step's
        # times to next use were off by as much).
        self.layer_time[position] = sim.now_s - self.position_start_s

    def encoding(self, sim: Simulator, block: int) -> int:
        """The encoding a miss is fetched at: the last plan's ``demand_encoding`` for the block
        (full precision before any plan). A block the plan does not target adds its drift at
        that encoding (its use certain) to what the misses since the plan spent: beyond the
        budget's headroom the plan left, it comes at full precision (``demand_encoding`` takes
        each block alone; the misses before the next step share the headroom).

        With ``plan_misses``, the first miss of a position first runs a step with the
        position's missing blocks flagged demand, as the controller does on a lease miss, and
        the miss comes at that plan's target (full precision if it has none)."""
        if self.plan is None:
            return 0
        if not self.plan_misses:
            encoding = self.plan.demand_encoding_of(block)
            if self.plan.target_hbm_encoding[block] != NONE:
                return encoding  # its cost is in the plan's
            assert self.snapshot is not None
            drift = float(self.snapshot.blocks.sensitivity[block, encoding])
            if drift > self._headroom:
                return 0
            self._headroom -= drift
            return encoding
        if self._miss_at != (sim.step, sim.position):
            self._miss_at = (sim.step, sim.position)
            needed = sim.needed(sim.step, sim.position)
            self._step(sim, demand=needed[sim.encoding[needed] < 0].tolist())
        target = int(self.plan.target_hbm_encoding[block])
        return target if target != NONE else 0

    def victims(self, sim: Simulator, nbytes: int, protected: set[int]) -> list[int]:
        candidate = sim.encoding >= 0
        candidate[list(protected)] = False
        candidate[sim.on_the_wire()] = False
        resident = np.flatnonzero(candidate)
        if self.plan is not None:
            # Lowest value density in the last plan first; among equals (the blocks the plan
            # does not target, all 0), the one whose layer runs again last (Belady's choice
            # by the schedule: the layers just run come round last, the current one after a
            # whole pass).
            positions = sim.layout.positions
            ahead = (sim.layout.position[resident] - sim.position - 1) % positions + 1
            order = np.lexsort((-ahead, self.plan.value_density[resident]))
            resident = resident[order]
        chosen, freed = [], 0
        for block in resident.tolist():
            if freed >= nbytes:
                break
            chosen.append(block)
            freed += sim.size_of[block][sim.encoding_of[block]]
        return chosen

    @property
    def predicted_set_recall(self) -> float | None:
        """The policy's own predicted set (experts with p(use) >= ``predicted_set_threshold``)
        against the experts each layer then chose, as the step counts it; None before any."""
        if self.state is None:
            return None
        recall = self.state.quality_total.recall
        return None if np.isnan(recall) else recall
