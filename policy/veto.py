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

from policy._kernels import stable_argsort
from policy._veto_budget import (
    all_candidates,
    budget_round,
    choose_fixes,
    compact_candidates,
    sort_keys,
)
from policy._veto_kernels import fit_rows, quality_costs, veto_entry
from policy.config import PolicyConfig
from policy.plan import RULE_CODES, Rule
from policy.predict import Prediction
from policy.score import Scores, Targets
from policy.snapshot import NONE, Snapshot

_NO_KEY = np.zeros(0)
_NO_MASK = np.zeros(0, dtype=bool)


def _column(values: np.ndarray | float, n: int, dtype: type) -> np.ndarray:
    """``values`` (an array of ``n``, or one value for all) as ``n`` values of ``dtype``.
    PERF: ``np.full`` for one value, not a broadcast view of it (four a batch)."""
    if isinstance(values, np.ndarray) and values.ndim:
        return np.asarray(values, dtype)
    return np.full(n, values, dtype)


@dataclass
class Rejections:
    block: list[np.ndarray] = field(default_factory=list)
    rule: list[np.ndarray] = field(default_factory=list)
    proposed: list[np.ndarray] = field(default_factory=list)
    fallback: list[np.ndarray] = field(default_factory=list)
    value: list[np.ndarray] = field(default_factory=list)
    limit: list[np.ndarray] = field(default_factory=list)

    def add(
        self,
        rule: Rule,
        block: np.ndarray,
        proposed: np.ndarray | int,
        fallback: np.ndarray | int,
        value: np.ndarray | float,
        limit: np.ndarray | float,
    ) -> None:
        n = len(block)
        if not n:
            return
        self.block.append(np.asarray(block, np.int64))
        self.rule.append(np.full(n, RULE_CODES.index(rule), np.int8))
        self.proposed.append(_column(proposed, n, np.int64))
        self.fallback.append(_column(fallback, n, np.int64))
        self.value.append(_column(value, n, np.float64))
        self.limit.append(_column(limit, n, np.float64))

    def arrays(self) -> tuple[np.ndarray, ...]:
        def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            if len(parts) == 1:  # PERF: a million budget rejections at a million blocks
                return np.ascontiguousarray(parts[0], dtype)
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        return (
            cat(self.block, np.int64),
            cat(self.rule, np.int8),
            cat(self.proposed, np.int64),
            cat(self.fallback, np.int64),
            cat(self.value, np.float64),
            cat(self.limit, np.float64),
        )


@dataclass(frozen=True)
class VetoResult:
    rejections: Rejections
    quality_cost: float  # before the capacity guard
    cost: np.ndarray  # per block, p(use) * sensitivity at its HBM encoding after the veto
    # The budget rule's price: the most quality saved per extra byte among the candidates
    # its last round left unfixed (0 when it fixed them all; inf when it made no round).
    quality_price: float = np.inf
    # Per tier, the bytes of the HBM copies the targets hold after the veto.
    tier_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def quality_cost(snapshot: Snapshot, hbm: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per block: ``p(use) * sensitivity`` at its HBM encoding (0 when not in HBM)."""
    cost: np.ndarray = quality_costs(hbm, p, snapshot.blocks.sensitivity)
    return cost


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
    b = snapshot.blocks
    bits = snapshot.encodings.bits
    hbm = targets.hbm_encoding
    p = prediction.use_probability
    rejections = Rejections()
    price = np.inf

    # With ``budget_hysteresis``, a fix to the encoding a block holds already counts a
    # 1 / (1 + hysteresis_multiple) share of its extra bytes; 1.0 leaves the order as it was.
    sticky = 1.0 / (1.0 + config.hysteresis_multiple) if config.budget_hysteresis else 1.0

    # 1. Leases (and, in the same pass, what rules 2 and 3 start from).
    rows, proposed, protected, bad, tier_bytes, cost, candidates, total, valid = veto_entry(
        b.leased,
        b.hbm_encoding,
        hbm,
        scores.static.allowed,
        b.hbm_tier,
        b.nbytes,
        p,
        b.sensitivity,
        scores.static.budget_fallback,
        len(scores.hbm_budget_bytes),
        sticky,
    )
    rejections.add(Rule.LEASED, rows, proposed, b.hbm_encoding[rows], 1.0, 0.0)

    # 2. Floors and unknown sensitivities.
    if len(bad):
        below_floor = bits[hbm[bad]] < b.floor_bits[bad]
        fallback = scores.static.floor_fallback[bad]
        proposed = hbm[bad].copy()
        placed = _fit(snapshot, scores, targets, bad, fallback, tier_bytes)
        kept = placed != NONE
        cost[bad] = 0.0
        cost[bad[kept]] = p[bad[kept]] * b.sensitivity[bad[kept], placed[kept]]
        for rule, mask in ((Rule.FLOOR, below_floor), (Rule.UNKNOWN_SENSITIVITY, ~below_floor)):
            rows = bad[mask]
            rejections.add(
                rule, rows, proposed[mask], placed[mask], bits[proposed[mask]], b.floor_bits[rows]
            )
        candidates, total, valid = all_candidates(  # the entry's less the forbidden rows
            cost,
            protected,
            hbm,
            scores.static.budget_fallback,
            p,
            b.sensitivity,
            b.nbytes,
            b.hbm_encoding,
            sticky,
        )

    # 3. The quality budget. Each round moves the blocks whose fix saves the most per extra
    # byte to a less sensitive encoding (or out of HBM); a block may need several rounds.
    # PERF: the candidates come from the entry's pass and are carried from round to round
    # (policy._veto_budget), instead of a pass over every block per round.
    compacted = True
    quality: float | None = None  # the cost's sum where the loop ended on it, unchanged since
    for _ in range(len(bits) + 1):
        total_cost = float(cost.sum())
        excess = total_cost - config.quality_budget
        if excess <= 1e-15:
            quality = total_cost
            break
        if not compacted:  # the last round left its candidates to compact
            candidates, total, valid = compact_candidates(*candidates)
        contributors, current, fallback, saving, order_key, old_bytes, new_bytes = candidates
        if not len(contributors):
            break
        # Most saved per extra byte first, until the excess is saved. PERF: by selection, not
        # a sort of every candidate (two sorts of 895,000 took 90 ms a round at a million).
        chosen, certain = choose_fixes(order_key, saving, total, valid, excess - 1e-15)
        if not certain:  # the sum lies within rounding of the excess: as the sorting code did
            order = stable_argsort(sort_keys(order_key))
            count = int(np.searchsorted(np.cumsum(saving[order]), excess - 1e-15)) + 1
            chosen = np.zeros(len(order_key), dtype=bool)
            chosen[order[:count]] = True
        # PERF: the round's bookkeeping compiled too (a dozen numpy calls before).
        fixed, before, placed, cost_before, price, candidates, total, valid, compacted = (
            budget_round(
                contributors,
                current,
                fallback,
                saving,
                order_key,
                old_bytes,
                new_bytes,
                chosen,
                cost,
                p,
                b.sensitivity,
                scores.static.budget_fallback,
                b.nbytes,
                hbm,
                b.hbm_tier,
                targets.chosen_density,
                scores.hbm_budget_bytes,
                tier_bytes,
                targets.vetoed_out,
                targets.quality_bound,
                b.hbm_encoding,
                sticky,
            )
        )
        rejections.add(
            Rule.QUALITY_BUDGET, fixed, before, placed, cost_before, config.quality_budget
        )

    # 4. Capacity guard.
    if quality is None:  # PERF: else the sum the loop ended on (0.5 ms at a million)
        quality = float(cost.sum())
    _enforce_capacity(snapshot, scores, targets, protected, tier_bytes, rejections, cost)
    return VetoResult(rejections, quality, cost, price, tier_bytes)


def _fit(
    snapshot: Snapshot,
    scores: Scores,
    targets: Targets,
    rows: np.ndarray,
    fallback: np.ndarray,
    tier_bytes: np.ndarray,
) -> np.ndarray:
    """Move ``rows`` to ``fallback`` encodings where their tier has room (most valuable first;
    ``tier_bytes`` holds each tier's HBM bytes and is kept up to date), else out of HBM.
    Returns the encoding each row ended at (``NONE``: out of HBM)."""
    b = snapshot.blocks
    hbm = targets.hbm_encoding
    placed: np.ndarray = fit_rows(
        rows,
        fallback,
        _NO_KEY,
        False,
        hbm,
        b.hbm_tier,
        b.nbytes,
        targets.chosen_density,
        scores.hbm_budget_bytes,
        tier_bytes,
        _NO_MASK,
        False,
    )
    targets.vetoed_out[rows[placed == NONE]] = True
    targets.quality_bound[rows[placed != NONE]] = True
    hbm[rows] = placed
    return placed


def _enforce_capacity(
    snapshot: Snapshot,
    scores: Scores,
    targets: Targets,
    protected: np.ndarray,
    tier_bytes: np.ndarray,
    rejections: Rejections,
    cost: np.ndarray,
) -> None:
    """Take the least valuable unprotected blocks out of any HBM tier above its budget
    (their quality ``cost`` becomes 0; ``tier_bytes`` kept up to date)."""
    b = snapshot.blocks
    hbm = targets.hbm_encoding
    over = [t for t, _ in scores.static.hbm_groups if tier_bytes[t] > scores.hbm_budget_bytes[t]]
    for tier in over:  # rare: rules 2 and 3 only add bytes that fit
        mine = np.flatnonzero(b.hbm_tier == tier)
        rows = mine[hbm[mine] != NONE]
        sizes = b.nbytes[rows, hbm[rows]]
        total = int(sizes.sum())
        budget = scores.hbm_budget_bytes[tier]
        movable = ~protected[rows]
        order = stable_argsort(targets.chosen_density[rows[movable]])
        freed = np.cumsum(sizes[movable][order])
        count = int(np.searchsorted(freed, total - budget)) + 1
        out = rows[movable][order[:count]]
        rejections.add(Rule.CAPACITY, out, hbm[out], NONE, total, budget)
        tier_bytes[tier] -= int(b.nbytes[out, hbm[out]].sum())
        targets.vetoed_out[out] = True
        hbm[out] = NONE
        cost[out] = 0.0
