"""The accuracy veto: the one place where quality rules are enforced.

Rules, in order, on the targets scoring proposed:

1. ``leased``: a leased block's HBM copy is untouchable (no eviction, no re-encoding).
2. ``floor``: a block may not sit below its precision floor; ``unknown-sensitivity``: nor at a
   precision whose sensitivity was never measured.
3. ``quality-budget``: the sum over HBM blocks of ``p(use) * sensitivity(chosen encoding)`` may not
   exceed the budget; the blocks whose fix buys the most quality per extra byte are fixed first.
4. ``capacity``: no tier ends above its budget (a guard: rules 2 and 3 only add bytes that fit).

A vetoed block falls back to the least harmful alternative, never out of the pool: the smallest
encoding that satisfies the rule if the tier has room for it, else no HBM copy (it is served from
its fallback copy, at full precision). Every rejection is recorded with its rule and numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policy._veto_chain import DONE, veto_rules
from policy._veto_resume import resume
from policy.config import PolicyConfig
from policy.plan import RULE_CODES, Rule
from policy.predict import Prediction
from policy.score import Scores, Targets, _every_block
from policy.snapshot import Snapshot

_LEASED_CODE = RULE_CODES.index(Rule.LEASED)
_BUDGET_CODE = RULE_CODES.index(Rule.QUALITY_BUDGET)


def _column(values: np.ndarray | float, n: int, dtype: type) -> np.ndarray:
    """``values`` (an array of ``n``, or one value for all) as ``n`` contiguous values of
    ``dtype``. PERF: ``np.full`` for one value, not a broadcast view of it (four a batch)."""
    if isinstance(values, np.ndarray) and values.ndim:
        return np.ascontiguousarray(values, dtype)
    return np.full(n, values, dtype)


_Batch = tuple[
    Rule,
    np.ndarray,
    np.ndarray | int,
    np.ndarray | int,
    np.ndarray | float,
    np.ndarray | float,
]


@dataclass
class Rejections:
    """The veto's rejections, batch by batch: a rule's blocks (in block order), what each
    proposed and fell back to, the rule's number and its limit (an array, or one for all)."""

    batches: list[_Batch] = field(default_factory=list)
    # Or all of them at once, as the six columns ``arrays`` returns, made in compiled code
    # where the veto ran there whole (``policy._veto_chain.veto_rules``); never both.
    columns: tuple[np.ndarray, ...] | None = None

    def add(
        self,
        rule: Rule,
        block: np.ndarray,
        proposed: np.ndarray | int,
        fallback: np.ndarray | int,
        value: np.ndarray | float,
        limit: np.ndarray | float,
    ) -> None:
        assert self.columns is None, "rejections made whole take no batch"
        if len(block):
            self.batches.append((rule, block, proposed, fallback, value, limit))

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The plan's six rejection columns (block, rule code, proposed, fallback, value,
        limit), batches in the order added.

        PERF: the columns are made here, once (one batch, most steps: six numpy calls, where
        the batch's columns and then their concatenation took twelve); a single batch is not
        copied (a million budget rejections at a million blocks)."""
        if self.columns is not None:
            return self.columns
        columns: list[tuple[np.ndarray, ...]] = [
            (
                np.ascontiguousarray(block, np.int64),
                np.full(len(block), RULE_CODES.index(rule), np.int8),
                _column(proposed, len(block), np.int64),
                _column(fallback, len(block), np.int64),
                _column(value, len(block), np.float64),
                _column(limit, len(block), np.float64),
            )
            for rule, block, proposed, fallback, value, limit in self.batches
        ]
        if len(columns) == 1:
            return columns[0]
        dtypes = (np.int64, np.int8, np.int64, np.int64, np.float64, np.float64)
        if not columns:
            return tuple(np.zeros(0, dtype) for dtype in dtypes)
        return tuple(np.concatenate(parts) for parts in zip(*columns, strict=True))


@dataclass(frozen=True)
class VetoResult:
    rejections: Rejections
    quality_cost: float  # the sum of ``cost``
    cost: np.ndarray  # per block, p(use) * sensitivity at its HBM encoding after the veto
    # The budget rule's price: the most quality saved per extra byte among the candidates
    # its last round left unfixed (0 when it fixed them all; inf when it made no round).
    quality_price: float = np.inf
    # Per tier, the bytes of the HBM copies the targets hold after the veto.
    tier_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def veto(
    snapshot: Snapshot,
    scores: Scores,
    targets: Targets,
    prediction: Prediction,
    config: PolicyConfig,
) -> VetoResult:
    """Apply the rules to ``targets`` in place; return the rejections and the quality cost.

    Rejections are recorded rule by rule (the budget round by round), each batch in block
    order.
    """
    return veto_and_refine(snapshot, scores, targets, prediction, config, upgrade=False)[0]


def veto_and_refine(
    snapshot: Snapshot,
    scores: Scores,
    targets: Targets,
    prediction: Prediction,
    config: PolicyConfig,
    upgrade: bool = True,
) -> tuple[VetoResult, np.ndarray]:
    """``veto``, then, where ``upgrade``, ``policy.score.refine`` on the targets it leaves
    (with its ``tier_bytes``): the result's ``cost`` and ``quality_cost`` are the final
    targets' (the blocks upgraded at full precision). Returns also the blocks upgraded.

    PERF: the rules in one compiled call (``policy._veto_chain.veto_rules``; Python goes on
    where a rare case stops it, ``policy._veto_resume``), where the veto's kernels and
    ``refine``'s were called one by one from Python."""
    b = snapshot.blocks
    static = scores.static
    # With ``budget_hysteresis``, a fix to the encoding a block holds already counts a
    # 1 / (1 + hysteresis_multiple) share of its extra bytes; 1.0 leaves the order as it was.
    sticky = 1.0 / (1.0 + config.hysteresis_multiple) if config.budget_hysteresis else 1.0
    status, quality, price, over, tier_bytes, cost, upgraded, columns, stopped = veto_rules(
        b.leased,
        b.hbm_encoding,
        targets.hbm_encoding,
        static.allowed,
        b.hbm_tier,
        b.nbytes,
        prediction.use_probability,
        b.sensitivity,
        static.budget_fallback,
        sticky,
        targets.chosen_density,
        scores.hbm_budget_bytes,
        targets.vetoed_out,
        targets.quality_bound,
        config.quality_budget,
        len(snapshot.encodings.bits) + 1,
        upgrade,
        static.decode_rate,
        scores.imminence,
        static.hbm_group_tiers,
        _every_block(static.hbm_groups),
        static.least_upgrade_nbytes,
        config.precision_hysteresis,
        scores.used,
        scores.pinned,
        b.fallback_level,
        config.hysteresis_multiple,
        static.per_byte_to_hbm_s,
        _LEASED_CODE,
        _BUDGET_CODE,
    )
    if status == DONE and not over:
        rejections = Rejections(columns=columns)
    else:  # rare: Python goes on where the chain stopped
        rejections = Rejections()
        quality, price, upgraded = resume(
            snapshot, scores, targets, prediction, config, upgrade, sticky, status, price,
            tier_bytes, cost, stopped, rejections,
        )  # fmt: skip
    return VetoResult(rejections, quality, cost, price, tier_bytes), upgraded
