"""A discrete-event simulator of decoding with weights that do not all fit in HBM.

Each decode step visits the schedule positions in order (embedding, layers, head). At a position
the policy may first act (prefetch, evict); then the router's choice is revealed (for an MoE
layer), every block the position needs that is not in HBM is fetched on demand, the policy may act
again (a prefetch issued then overlaps with this layer's compute), the layer stalls
until its last block has arrived (and decoded, for a compressed copy), and computes for the time
the hardware model gives for reading its weights. Transfers share one host-to-HBM link of finite
bandwidth: non-preemptive, one at a time, most urgent class first, in the order issued within a
class; they overlap with compute.

The simulator is exact and deterministic: the tests check it against stalls computed by hand.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from bench.replay.presets import HardwarePreset, Layout

DEMAND, IMMINENT, PREFETCH, DEMOTION = 0, 1, 2, 3
FULL = 0


class SimulationError(RuntimeError):
    """The configuration cannot run (a position needs more than HBM holds)."""


@dataclass
class Transfer:
    block: int
    encoding: int
    nbytes: int
    priority: int
    issued_s: float
    seq: int
    done_s: float | None = None  # set once the link starts it (then it cannot be cancelled)
    cancelled: bool = False


class Link:
    """One link, one transfer at a time, classes by priority, FIFO within a class."""

    def __init__(self, gbps: float, latency_s: float):
        self.bytes_per_s = gbps * 1e9
        self.latency_s = latency_s
        self.free_s = 0.0
        self._queue: list[tuple[int, int, Transfer]] = []
        self._seq = itertools.count()
        self.bytes_moved = 0
        self.started: deque[Transfer] = deque()  # in start order, so in completion order

    def submit(
        self, block: int, encoding: int, nbytes: int, priority: int, now_s: float
    ) -> Transfer:
        transfer = Transfer(block, encoding, nbytes, priority, now_s, next(self._seq))
        heapq.heappush(self._queue, (priority, transfer.seq, transfer))
        return transfer

    def raise_priority(self, transfer: Transfer, priority: int) -> None:
        if transfer.done_s is None and priority < transfer.priority:
            transfer.priority = priority
            heapq.heappush(self._queue, (priority, transfer.seq, transfer))

    def cancel(self, transfer: Transfer) -> bool:
        if transfer.done_s is not None:
            return False
        transfer.cancelled = True
        return True

    def _start_next(self, before_s: float | None) -> bool:
        while self._queue:
            priority, _, transfer = self._queue[0]
            if transfer.cancelled or transfer.done_s is not None or priority != transfer.priority:
                heapq.heappop(self._queue)  # a stale entry
                continue
            start = max(self.free_s, transfer.issued_s)
            if before_s is not None and start >= before_s:
                return False
            heapq.heappop(self._queue)
            transfer.done_s = start + self.latency_s + transfer.nbytes / self.bytes_per_s
            self.free_s = transfer.done_s
            self.bytes_moved += transfer.nbytes
            self.started.append(transfer)
            return True
        return False

    def advance(self, now_s: float) -> None:
        """Start every queued transfer the link would have started before ``now_s``."""
        while self._start_next(now_s):
            pass

    def finish(self, transfer: Transfer) -> float:
        """Start transfers in order until ``transfer`` has started; return its completion time."""
        while transfer.done_s is None:
            if not self._start_next(None):
                raise SimulationError(f"transfer of block {transfer.block} is not queued")
        return transfer.done_s


class Policy(Protocol):
    name: str

    def setup(self, sim: Simulator) -> None: ...
    def before_position(self, sim: Simulator, step: int, position: int) -> None: ...
    def during_position(
        self, sim: Simulator, step: int, position: int, needed: np.ndarray
    ) -> None: ...
    def after_position(
        self, sim: Simulator, step: int, position: int, needed: np.ndarray
    ) -> None: ...
    def victims(self, sim: Simulator, nbytes: int, protected: set[int]) -> list[int]: ...
    def encoding(self, sim: Simulator, block: int) -> int: ...


@dataclass
class Result:
    policy: str
    steps: int
    total_s: float = 0.0
    stall_s: float = 0.0
    accesses: int = 0
    hits: int = 0
    bytes_moved: int = 0
    quality_cost: float = 0.0  # summed over steps
    expert_uses: int = 0  # routed experts read, summed over positions
    prefetched_uses: int = 0  # of which the policy had fetched ahead of need (see below)
    prefetches: int = 0  # fetches the policy issued itself (not a miss's demand fetch)
    prefetches_used: int = 0  # of which the block was read before it left HBM
    extra: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float | None]:
        """Figures per token. ``prediction_recall``: the share of routed-expert reads whose
        expert the policy had itself fetched since that expert's previous read (its prediction,
        acted on); None for a policy that never fetches ahead (it predicts nothing).
        ``prefetch_precision``: the share of those fetches read before they left HBM."""
        steps = max(self.steps, 1)
        ahead = self.prefetches > 0
        return {
            "stall_ms_per_token": 1e3 * self.stall_s / steps,
            "tokens_per_s": steps / self.total_s if self.total_s else 0.0,
            "hbm_hit_rate": self.hits / self.accesses if self.accesses else 0.0,
            "bytes_moved_per_token": self.bytes_moved / steps,
            "quality_cost": self.quality_cost / steps,
            "prediction_recall": (
                self.prefetched_uses / self.expert_uses if ahead and self.expert_uses else None
            ),
            "prefetch_precision": self.prefetches_used / self.prefetches if ahead else None,
        }


class Simulator:
    """State of one replay: HBM contents, the link, the clock, and the counters."""

    def __init__(
        self,
        layout: Layout,
        hardware: HardwarePreset,
        chosen: list[list[np.ndarray]],
        hbm_bytes: int,
        sizes: np.ndarray,
        sensitivity: np.ndarray,
        decode_gbps: np.ndarray,
    ):
        self.layout = layout
        self.hardware = hardware
        self.chosen = chosen
        self.capacity = hbm_bytes
        self.sizes = sizes  # [N, E] bytes per encoding
        self.sensitivity = sensitivity  # [N, E]
        self.decode_gbps = decode_gbps  # [E], inf: usable as stored
        n = len(layout.block_names)
        self.encoding = np.full(n, -1, np.int64)  # in HBM at this encoding (or in flight to it)
        # PERF: the same as ``encoding`` and ``sizes`` as Python lists, for reads of one block (a
        # numpy scalar read costs several times a list's; they were a fifth of a qwen3 replay).
        # Read-only for policies; the simulator keeps them in step (``sizes`` is read again when
        # a run starts, so a caller may adjust it before).
        self.encoding_of: list[int] = [-1] * n
        self.size_of: list[list[int]] = sizes.tolist()
        self.transfer: list[Transfer | None] = [None] * n
        self.flying: set[int] = set()  # blocks whose transfer object is still held
        self.prefetched: set[int] = set()  # fetched by the policy itself, not read since
        self.prefetches = 0
        self.used = 0
        self.now_s = 0.0
        self.link = Link(hardware.host_gbps, hardware.transfer_latency_s)
        self.step = 0
        self.position = 0
        # PERF: what each position needs, built once (policies look ahead through it too); built
        # on every call, it was a tenth of a qwen3 replay.
        self._needed: list[list[np.ndarray]] = [
            [self._needed_at(step, position) for position in range(layout.positions)]
            for step in range(len(chosen))
        ]

    # -- what policies may call --------------------------------------------------------------

    def needed(self, step: int, position: int) -> np.ndarray:
        """The blocks ``position`` of decode step ``step`` reads (dense first, then the routed
        experts in expert order). The array is shared: callers must not modify it."""
        return self._needed[step][position]

    def _needed_at(self, step: int, position: int) -> np.ndarray:
        dense = self.layout.dense_at[position]
        moe = self.layout.moe_layer_of_position(position)
        if moe < 0:
            return dense
        return np.concatenate([dense, self.layout.expert_block[moe, self.chosen[step][moe]]])

    def ready(self, block: int) -> bool:
        """In HBM and arrived by now."""
        if self.encoding_of[block] < 0:
            return False
        transfer = self.transfer[block]
        return transfer is None or (transfer.done_s is not None and transfer.done_s <= self.now_s)

    def in_flight(self) -> list[int]:
        """The blocks fetched that have not arrived by now (queued or on the wire). Transfers
        that have arrived are forgotten on the way (their blocks are ready either way)."""
        arrived = [
            block
            for block in self.flying
            if (done_s := self.transfer[block].done_s) is not None  # type: ignore[union-attr]
            and done_s <= self.now_s
        ]
        for block in arrived:
            self.transfer[block] = None
        self.flying.difference_update(arrived)
        return sorted(self.flying)

    def on_the_wire(self) -> list[int]:
        """The blocks whose transfer has started and not arrived by now (not evictable)."""
        started = self.link.started
        while started and started[0].done_s is not None and started[0].done_s <= self.now_s:
            started.popleft()
        return [transfer.block for transfer in started]

    def evictable(self, block: int) -> bool:
        """In HBM and either arrived or still cancellable (not on the wire)."""
        if self.encoding_of[block] < 0:
            return False
        transfer = self.transfer[block]
        return transfer is None or transfer.done_s is None or transfer.done_s <= self.now_s

    def preload(self, block: int, encoding: int) -> bool:
        """Place a block before serving starts (free, at time 0); False if it does not fit."""
        size = self.size_of[block][encoding]
        if self.encoding_of[block] >= 0 or self.used + size > self.capacity:
            return False
        self.encoding[block] = self.encoding_of[block] = encoding
        self.used += size
        return True

    def evict(self, block: int) -> None:
        if not self.evictable(block):
            raise SimulationError(f"block {block} is on the wire and cannot be evicted")
        transfer = self.transfer[block]
        if transfer is not None:
            self.link.cancel(transfer)
        self.used -= self.size_of[block][self.encoding_of[block]]
        self.encoding[block] = self.encoding_of[block] = -1
        self.transfer[block] = None
        self.flying.discard(block)
        self.prefetched.discard(block)

    def fetch(
        self,
        policy: Policy,
        block: int,
        encoding: int,
        priority: int,
        protected: set[int],
        ahead: bool = True,
    ) -> bool:
        """Start bringing ``block`` into HBM at ``encoding``; make room through the policy.
        Returns False (and changes nothing) when room cannot be made. ``ahead``: the policy
        fetches it before it is needed (False only for the simulator's demand fetch of a miss);
        it counts towards the policy's prediction recall."""
        if self.encoding_of[block] >= 0:
            transfer = self.transfer[block]
            if transfer is not None:
                self.link.raise_priority(transfer, priority)
            return True
        size = self.size_of[block][encoding]
        short = self.used + size - self.capacity
        if short > 0:
            victims = policy.victims(
                self, short, protected if block in protected else protected | {block}
            )
            size_of, encoding_of = self.size_of, self.encoding_of
            freed = sum(size_of[v][encoding_of[v]] for v in victims)
            if freed < short or any(v in protected or not self.evictable(v) for v in victims):
                return False
            for victim in victims:
                self.evict(victim)
        self.encoding[block] = self.encoding_of[block] = encoding
        self.used += size
        self.transfer[block] = self.link.submit(block, encoding, size, priority, self.now_s)
        self.flying.add(block)
        if ahead:
            self.prefetched.add(block)
            self.prefetches += 1
        return True

    def _wait_for_the_wire(self, policy: Policy, block: int) -> None:
        """No room for a demand fetch: wait for the next transfer on the wire to land (a stall
        under memory pressure), so that its block becomes evictable."""
        on_wire = [self.transfer[b].done_s for b in self.on_the_wire()]  # type: ignore[union-attr]
        if not on_wire:
            raise SimulationError(
                f"{policy.name}: no room in {self.capacity} bytes of HBM for block "
                f"{self.layout.block_names[block]} at step {self.step}"
            )
        self.now_s = min(on_wire)
        self.link.advance(self.now_s)

    # -- the replay ----------------------------------------------------------------------------

    def run(self, policy: Policy) -> Result:
        result = Result(policy.name, len(self.chosen))
        self.size_of = self.sizes.tolist()
        policy.setup(self)
        positions = self.layout.positions
        decodes = np.isfinite(self.decode_gbps).tolist()
        decode_gbps = self.decode_gbps.tolist()
        sizes, sensitivity, compute_s = self.sizes, self.sensitivity, self.hardware.compute_s
        is_expert = self.layout.is_expert
        for step in range(len(self.chosen)):
            self.step = step
            for position in range(positions):
                self.position = position
                self.link.advance(self.now_s)
                policy.before_position(self, step, position)
                needed = self._needed[step][position]
                blocks = needed.tolist()
                protected = set(blocks)
                start_s = self.now_s
                result.accesses += len(blocks)
                # Fetches for one block never evict another (all are protected), so residency
                # read once holds; arrival is read as the clock moves.
                resident = (self.encoding[needed] >= 0).tolist()
                for block, present in zip(blocks, resident, strict=True):
                    if present:
                        transfer = self.transfer[block]
                        if transfer is None or (
                            transfer.done_s is not None and transfer.done_s <= self.now_s
                        ):
                            result.hits += 1
                            continue
                    while not self.fetch(
                        policy, block, policy.encoding(self, block), DEMAND, protected, False
                    ):
                        self._wait_for_the_wire(policy, block)
                policy.during_position(self, step, position, needed)
                arrival = self.now_s
                for block in blocks:
                    transfer = self.transfer[block]
                    if transfer is not None:
                        arrival = max(arrival, self.link.finish(transfer))
                encodings = self.encoding[needed]
                decode_s = 0.0
                for block, encoding in zip(blocks, encodings.tolist(), strict=True):
                    if decodes[encoding]:
                        decode_s += sizes[block, FULL] / (decode_gbps[encoding] * 1e9)
                weight_bytes = int(sizes[needed, encodings].sum())
                result.quality_cost += float(sensitivity[needed, encodings].sum())
                stall = (arrival - start_s) + decode_s
                result.stall_s += stall
                self.now_s = start_s + stall + compute_s(weight_bytes)
                for block in blocks:  # arrived: no longer on the wire
                    self.transfer[block] = None
                    if is_expert[block]:
                        result.expert_uses += 1
                        if block in self.prefetched:
                            result.prefetched_uses += 1
                    if block in self.prefetched:
                        result.prefetches_used += 1
                self.flying.difference_update(blocks)
                self.prefetched.difference_update(blocks)
                policy.after_position(self, step, position, needed)
        self.link.advance(self.now_s)
        result.total_s = self.now_s
        result.bytes_moved = self.link.bytes_moved
        result.prefetches = self.prefetches
        return result
