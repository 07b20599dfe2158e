"""The step's output: a typed plan.

The plan keeps its decisions as arrays (one row per transition, transfer, rejection) so that a step
over a million blocks does not build a million Python objects; :meth:`Plan.transitions`,
:meth:`Plan.transfers` and :meth:`Plan.rejections` return them as frozen dataclasses, each with
its reason, when a caller (the placement actor, a test, an admin) reads them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from policy.snapshot import LEVEL_KINDS, NONE
from pool.encoding import Encoding
from pool.states import BlockState
from pool.tiers import TierKind

if TYPE_CHECKING:
    from policy.demand import DemandEncodings

STATE_CODES: tuple[BlockState, ...] = tuple(BlockState)


class Priority(enum.IntEnum):
    """Transfer classes, most urgent first (sorting by value is the point of this enum)."""

    DEMAND = 0  # a lease is waiting
    IMMINENT = 1  # needed within the imminent horizon
    PREFETCH = 2  # speculative
    DEMOTION = 3  # demotion, transcode or spill


class Rule(enum.Enum):
    LEASED = "leased"
    FLOOR = "floor"
    UNKNOWN_SENSITIVITY = "unknown-sensitivity"
    QUALITY_BUDGET = "quality-budget"
    CAPACITY = "capacity"


RULE_CODES: tuple[Rule, ...] = tuple(Rule)


@dataclass(frozen=True)
class Placement:
    """Where a block's fastest copy is: a tier kind and an encoding (``None``: no HBM copy)."""

    tier: TierKind
    encoding: Encoding | None


@dataclass(frozen=True)
class Explanation:
    """The signals behind a decision, for the audit log."""

    use_probability: float
    time_to_next_use_s: float
    value_density: float
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.reason} (p(use)={self.use_probability:.3f}, "
            f"next use in {self.time_to_next_use_s * 1e3:.2f} ms, "
            f"value {self.value_density:.3e} s/byte)"
        )


@dataclass(frozen=True)
class Transition:
    block_id: str
    block_index: int
    from_state: BlockState
    to_state: BlockState  # the state once the action completes
    via_promoting: bool  # the block is PROMOTING while its transfer is in flight
    source: Placement
    target: Placement
    fallback: TierKind  # where the block's fallback copy is once the action completes
    explanation: Explanation


@dataclass(frozen=True)
class Transfer:
    block_id: str
    block_index: int
    source: TierKind
    destination: TierKind
    source_tier: str
    destination_tier: str
    encoding: Encoding
    nbytes: int
    priority: Priority
    deadline_s: float

    @property
    def link(self) -> str:
        return f"{self.source.value}->{self.destination.value}"


@dataclass(frozen=True)
class Rejection:
    block_id: str
    block_index: int
    rule: Rule
    proposed: Encoding | None
    fallback: Encoding | None  # None: the block stays at (or goes to) its fallback copy
    numbers: dict[str, float]

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.numbers.items())
        fallback = self.fallback.name if self.fallback else "its fallback copy (not in HBM)"
        proposed = self.proposed.name if self.proposed else "-"
        return (
            f"{self.block_id}: {self.rule.value} vetoed {proposed}, "
            f"fell back to {fallback} ({shown})"
        )


@dataclass(frozen=True)
class Cancellation:
    block_id: str
    block_index: int
    encoding: Encoding
    reason: str


@dataclass(frozen=True)
class Metrics:
    quality_cost: float
    quality_budget: float
    hbm_bytes_by_tier: dict[str, int]
    warm_bytes_by_tier: dict[str, int]
    prediction_precision: float
    prediction_recall: float
    deferred_transfers: int
    phase_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TransitionArrays:
    """One row per transition; states are ``STATE_CODES`` indices, reasons ``REASONS`` ones,
    and ``target_*``/``fallback_level`` describe the block once the action completes."""

    block: np.ndarray
    from_state: np.ndarray
    to_state: np.ndarray
    via_promoting: np.ndarray
    source_level: np.ndarray
    source_encoding: np.ndarray
    target_level: np.ndarray
    target_encoding: np.ndarray
    fallback_level: np.ndarray
    reason: np.ndarray


@dataclass(frozen=True)
class TransferArrays:
    """One row per transfer: levels and tier indices of both ends, the encoding moved, its
    bytes, its ``Priority`` and its deadline."""

    block: np.ndarray
    source_level: np.ndarray
    destination_level: np.ndarray
    source_tier: np.ndarray
    destination_tier: np.ndarray
    encoding: np.ndarray
    nbytes: np.ndarray
    priority: np.ndarray
    deadline_s: np.ndarray


@dataclass(frozen=True)
class Plan:
    """What the step decided. Array fields are row-aligned per kind of record.

    ``target_hbm_encoding`` and ``target_fallback_level`` are the full target placement (one
    entry per block); the records list only what changes now (a transfer deferred to a later
    tick makes no transition yet).

    ``demand_encoding`` (one int8 encoding index per block, never ``NONE``) is the encoding at
    which to promote a block demanded before the next step (a lease miss), so that a miss needs
    no step of its own; ``demand_encoding_of(block)`` is one block's (computed when asked, see
    ``policy.demand``). Each block is taken alone, its use certain (p(use) = 1):

    - a block the plan targets in HBM: its target encoding;
    - else, when the plan's quality cost is above the budget (the veto made every fix it
      could): the least sensitive encoding its floor and known sensitivities allow (full
      precision, or an equally harmless smaller one);
    - else its densest allowed encoding from its fallback copy (what scoring gives a demanded
      block: floors and unknown sensitivities respected), moved, as the budget rule would fix
      it, to its next less sensitive allowed encoding while that saves at least the budget
      rule's price this step (the least quality saved per extra byte among the fixes it made):
      a dearer fix, the veto would find elsewhere. Where the budget rule made no fix, the
      budget's headroom (budget less the plan's quality cost) is the test instead: moved while
      its sensitivity passes the headroom.

    Where the budget binds, what it leaves unspent (the overshoot of its last fix) is not
    counted. Where it has headroom, that headroom is offered to each demand alone: a caller
    promoting several blocks before the next step keeps their drift together within
    ``metrics.quality_budget - metrics.quality_cost`` and promotes the rest at full precision
    (``bench/replay/weightpool_policy.py`` does). HBM the plan leaves free is not counted (the
    headroom kept for demand promotions takes the copy).
    """

    now_s: float
    block_ids: tuple[str, ...]
    encodings: tuple[Encoding, ...]
    tier_ids: tuple[str, ...]
    target_hbm_encoding: np.ndarray
    target_fallback_level: np.ndarray
    # transitions
    transition_rows: TransitionArrays  # one row per transition
    transfer_rows: TransferArrays  # one row per transfer, in priority then deadline order
    # rejections
    rejection_block: np.ndarray
    rejection_rule: np.ndarray  # RULE_CODES index
    rejection_proposed: np.ndarray
    rejection_fallback: np.ndarray
    rejection_value: np.ndarray  # the rule's measured number
    rejection_limit: np.ndarray  # the rule's limit
    # cancellations
    cancel_block: np.ndarray
    cancel_encoding: np.ndarray
    # signals, per block, for explanations
    use_probability: np.ndarray
    time_to_next_use_s: np.ndarray
    value_density: np.ndarray
    demand: DemandEncodings  # ``demand_encoding``, see above
    metrics: Metrics

    @property
    def demand_encoding(self) -> np.ndarray:
        """Every block's demand encoding (int8; see the class docstring), computed once (by
        ``policy.demand.DemandEncodings.all``, which keeps it)."""
        return self.demand.all()

    def demand_encoding_of(self, block: int) -> int:
        """Block ``block``'s demand encoding (a row index; see the class docstring)."""
        return self.demand.of(block)

    def _encoding(self, index: int) -> Encoding | None:
        return None if index == NONE else self.encodings[index]

    def _explain(self, block: int, reason: str) -> Explanation:
        return Explanation(
            float(self.use_probability[block]),
            float(self.time_to_next_use_s[block]),
            float(self.value_density[block]),
            reason,
        )

    @cached_property
    def transitions(self) -> tuple[Transition, ...]:
        out = []
        t = self.transition_rows
        for row, block in enumerate(t.block.tolist()):
            out.append(
                Transition(
                    self.block_ids[block],
                    block,
                    STATE_CODES[t.from_state[row]],
                    STATE_CODES[t.to_state[row]],
                    bool(t.via_promoting[row]),
                    Placement(
                        LEVEL_KINDS[int(t.source_level[row])],
                        self._encoding(int(t.source_encoding[row])),
                    ),
                    Placement(
                        LEVEL_KINDS[int(t.target_level[row])],
                        self._encoding(int(t.target_encoding[row])),
                    ),
                    LEVEL_KINDS[int(t.fallback_level[row])],
                    self._explain(block, REASONS[int(t.reason[row])]),
                )
            )
        return tuple(out)

    @cached_property
    def transfers(self) -> tuple[Transfer, ...]:
        out = []
        t = self.transfer_rows
        for row, block in enumerate(t.block.tolist()):
            out.append(
                Transfer(
                    self.block_ids[block],
                    block,
                    LEVEL_KINDS[int(t.source_level[row])],
                    LEVEL_KINDS[int(t.destination_level[row])],
                    self.tier_ids[int(t.source_tier[row])],
                    self.tier_ids[int(t.destination_tier[row])],
                    self.encodings[int(t.encoding[row])],
                    int(t.nbytes[row]),
                    Priority(int(t.priority[row])),
                    float(t.deadline_s[row]),
                )
            )
        return tuple(out)

    @cached_property
    def rejections(self) -> tuple[Rejection, ...]:
        out = []
        for row, block in enumerate(self.rejection_block.tolist()):
            rule = RULE_CODES[int(self.rejection_rule[row])]
            value_name, limit_name = RULE_NUMBERS[rule]
            out.append(
                Rejection(
                    self.block_ids[block],
                    block,
                    rule,
                    self._encoding(int(self.rejection_proposed[row])),
                    self._encoding(int(self.rejection_fallback[row])),
                    {
                        value_name: float(self.rejection_value[row]),
                        limit_name: float(self.rejection_limit[row]),
                    },
                )
            )
        return tuple(out)

    @cached_property
    def cancellations(self) -> tuple[Cancellation, ...]:
        return tuple(
            Cancellation(
                self.block_ids[block],
                block,
                self.encodings[int(self.cancel_encoding[row])],
                "the block's target no longer needs this copy",
            )
            for row, block in enumerate(self.cancel_block.tolist())
        )


REASONS: tuple[str, ...] = (
    "promote: valued above the HBM cut",
    "promote: a lease is waiting",
    "re-encode in HBM to fit more valuable blocks",
    "upgrade precision with spare HBM",
    "evict from HBM: valued below the cut",
    "copy to a warmer fallback tier",
    "drop a fallback copy: valued below the tier's cut",
    "regenerate in HBM from its source",
    "leave HBM: the veto found no room at a precision it allows",
)
(
    REASON_PROMOTE,
    REASON_DEMAND,
    REASON_SHRINK,
    REASON_UPGRADE,
    REASON_EVICT,
    REASON_WARM_UP,
    REASON_WARM_DOWN,
    REASON_REGENERATE,
    REASON_VETO_EVICT,
) = range(len(REASONS))

RULE_NUMBERS: dict[Rule, tuple[str, str]] = {
    Rule.LEASED: ("lease_count", "allowed_changes"),
    Rule.FLOOR: ("proposed_bits", "floor_bits"),
    Rule.UNKNOWN_SENSITIVITY: ("proposed_bits", "floor_bits"),
    Rule.QUALITY_BUDGET: ("block_cost", "budget"),
    Rule.CAPACITY: ("tier_bytes", "tier_budget_bytes"),
}
