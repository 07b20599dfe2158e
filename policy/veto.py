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
from policy._veto_budget import choose_fixes, fix_round, sort_keys
from policy._veto_candidates import all_candidates, compact_candidates
from policy._veto_kernels import fit_rows, quality_costs, veto_entry
from policy.config import PolicyConfig
from policy.plan import RULE_CODES, Rule
from policy.predict import Prediction
from policy.score import Scores, Targets
from policy.snapshot import NONE, Snapshot

_MAX = 0x7FFFFFFFFFFFFFFF  # no order key (``policy._select``)
_NO_KEY = np.zeros(0)
_NO_MASK = np.zeros(0, dtype=bool)
_NO_ROWS = np.zeros(0, dtype=np.int64)
_NO_RECORDS = (_NO_ROWS, _NO_ROWS, _NO_ROWS, _NO_KEY)


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

    def add(
        self,
        rule: Rule,
        block: np.ndarray,
        proposed: np.ndarray | int,
        fallback: np.ndarray | int,
        value: np.ndarray | float,
        limit: np.ndarray | float,
    ) -> None:
        if len(block):
            self.batches.append((rule, block, proposed, fallback, value, limit))

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The plan's six rejection columns (block, rule code, proposed, fallback, value,
        limit), batches in the order added.

        PERF: the columns are made here, once (one batch, most steps: six numpy calls, where
        the batch's columns and then their concatenation took twelve); a single batch is not
        copied (a million budget rejections at a million blocks)."""
        columns = [
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
    # (policy._veto_candidates), instead of a pass over every block per round.
    compacted = True
    records, used = _NO_RECORDS, 0
    quality: float | None = None  # the cost's sum where the loop ended on it, unchanged since
    for _ in range(len(bits) + 1):
        total_cost = float(cost.sum())
        excess = total_cost - config.quality_budget
        if excess <= 1e-15:
            quality = total_cost
            break
        if not compacted:  # the last round left its candidates to compact
            candidates, total, valid = compact_candidates(
                cost,
                hbm,
                scores.static.budget_fallback,
                p,
                b.sensitivity,
                b.nbytes,
                b.hbm_encoding,
                sticky,
                *candidates,
            )
        contributors, current, fallback, saving, order_key, old_bytes, new_bytes = candidates
        if not len(contributors):
            break
        # Most saved per extra byte first, until the excess is saved. PERF: by selection, not
        # a sort of every candidate (two sorts of 895,000 took 90 ms a round at a million).
        chosen, certain, least_key = choose_fixes(order_key, saving, total, valid, excess - 1e-15)
        if not certain:  # the sum lies within rounding of the excess: as the sorting code did
            order = stable_argsort(sort_keys(order_key))
            count = int(np.searchsorted(np.cumsum(saving[order]), excess - 1e-15)) + 1
            chosen = np.zeros(len(order_key), dtype=bool)
            chosen[order[:count]] = True
            least_key = int(order_key[order[count:]].min()) if count < len(order) else _MAX
        # PERF: the round's bookkeeping compiled too (a dozen numpy calls before).
        records, used, price, candidates, total, valid, compacted = fix_round(
            contributors,
            current,
            fallback,
            saving,
            order_key,
            old_bytes,
            new_bytes,
            chosen,
            least_key,
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
            records,
            used,
        )
    # The rounds' records, one batch (each round's in block order).
    fixed, before, placed, cost_before = (column[:used] for column in records)
    rejections.add(Rule.QUALITY_BUDGET, fixed, before, placed, cost_before, config.quality_budget)

    # 4. Capacity guard.
    # PERF: else the sum the loop ended on (0.5 ms at a million), and the step's too.
    if _enforce_capacity(snapshot, scores, targets, protected, tier_bytes, rejections, cost):
        quality = None
    if quality is None:
        quality = float(cost.sum())
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
) -> bool:
    """Take the least valuable unprotected blocks out of any HBM tier above its budget
    (their quality ``cost`` becomes 0; ``tier_bytes`` kept up to date). Returns whether any
    tier was."""
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
    return bool(over)
