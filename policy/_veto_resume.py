"""The veto in Python from where ``policy._veto_chain.veto_rules`` stopped (rare): a proposal
that breaks a floor or an unknown sensitivity (rule 2), a budget round whose choice is not
certain (sorted, as the sorting code chose), a tier above its budget after rule 3 (the capacity
guard). The same rules as ``policy.veto``'s, in the same order, on the state the chain left.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from policy._kernels import stable_argsort
from policy._sum import pairwise_sum
from policy._veto_budget import fix_round, sort_keys
from policy._veto_candidates import all_candidates
from policy._veto_chain import (
    DONE,
    FORBIDDEN,
    NO_CANDIDATES,
    UNCERTAIN,
    Stopped,
    budget_round,
    guard_and_refine,
    stopped_state,
)
from policy._veto_kernels import fit_rows
from policy.config import PolicyConfig
from policy.plan import Rule
from policy.predict import Prediction
from policy.score import Scores, Targets, _every_block, refine
from policy.snapshot import NONE, Snapshot

if TYPE_CHECKING:
    from policy.veto import Rejections

_MAX = 0x7FFFFFFFFFFFFFFF  # no order key (``policy._select``)
_NO_KEY = np.zeros(0)
_NO_MASK = np.zeros(0, dtype=bool)
_Records = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def resume(
    snapshot: Snapshot,
    scores: Scores,
    targets: Targets,
    prediction: Prediction,
    config: PolicyConfig,
    upgrade: bool,
    sticky: float,
    status: int,
    price: float,
    tier_bytes: np.ndarray,
    cost: np.ndarray,
    stopped: Stopped,
    rejections: Rejections,
) -> tuple[float, float, np.ndarray]:
    """The rules from where ``veto_rules`` stopped (its ``status``, ``price``, ``tier_bytes``,
    ``cost`` and ``stopped``), the rejections recorded in ``rejections``; then, where
    ``upgrade``, the precision upgrades. Returns the quality cost, the budget's price and the
    blocks upgraded."""
    b = snapshot.blocks
    static = scores.static
    bits = snapshot.encodings.bits
    hbm = targets.hbm_encoding
    p = prediction.use_probability
    rounds, lease_batch, protected, bad, candidates, total, valid, records, used = stopped_state(
        stopped
    )
    rows, proposed, restored = lease_batch
    rejections.add(Rule.LEASED, rows, proposed, restored, 1.0, 0.0)

    # 2. Floors and unknown sensitivities.
    if status == FORBIDDEN:
        below_floor = bits[hbm[bad]] < b.floor_bits[bad]
        fallback = static.floor_fallback[bad]
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
            static.budget_fallback,
            p,
            b.sensitivity,
            b.nbytes,
            b.hbm_encoding,
            sticky,
        )

    # 3. The quality budget. Each round moves the blocks whose fix saves the most per extra
    # byte to a less sensitive encoding (or out of HBM); a block may need several rounds.
    # PERF: the candidates come from the entry's pass and are carried from round to round
    # (policy._veto_candidates), instead of a pass over every block per round. Here, the
    # rounds from the one the chain stopped at (its sum made again); none where it was done.
    compacted = True
    quality: float | None = None  # the cost's sum where the loop ended on it, unchanged since
    for _ in range(rounds, len(bits) + 1) if status != DONE else ():
        total_cost = pairwise_sum(cost)
        excess = total_cost - config.quality_budget
        if excess <= 1e-15:
            quality = total_cost
            break
        # Most saved per extra byte first, until the excess is saved (the candidates compacted
        # first where the round before left them to compact). PERF: by selection, not a sort
        # of every candidate (two sorts of 895,000 took 90 ms a round at a million).
        outcome, records, used, round_price, candidates, total, valid, compacted = budget_round(
            excess - 1e-15,
            compacted,
            candidates,
            total,
            valid,
            cost,
            p,
            b.sensitivity,
            static.budget_fallback,
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
        if outcome == NO_CANDIDATES:
            break
        if outcome == UNCERTAIN:  # the sum lies within rounding of the excess: sort, as before
            records, used, round_price, candidates, total, valid, compacted = _sorted_round(
                snapshot, scores, targets, prediction, candidates, excess - 1e-15, cost,
                tier_bytes, sticky, records, used,
            )  # fmt: skip
        price = round_price
    # The rounds' records, one batch (each round's in block order).
    fixed, before, placed, cost_before = (column[:used] for column in records)
    rejections.add(Rule.QUALITY_BUDGET, fixed, before, placed, cost_before, config.quality_budget)

    # 4. Capacity guard; then the upgrades, where asked.
    over, upgraded = guard_and_refine(
        tier_bytes,
        scores.hbm_budget_bytes,
        upgrade,
        hbm,
        b.hbm_tier,
        b.leased,
        b.nbytes,
        b.sensitivity,
        static.decode_rate,
        p,
        scores.imminence,
        static.hbm_group_tiers,
        _every_block(static.hbm_groups),
        static.least_upgrade_nbytes,
        config.precision_hysteresis,
        scores.used,
        b.hbm_encoding,
        scores.pinned,
        b.fallback_level,
        config.hysteresis_multiple,
        static.per_byte_to_hbm_s,
        cost,
    )
    if over:  # rules 2 and 3 only add bytes that fit
        _enforce_capacity(snapshot, scores, targets, protected, tier_bytes, rejections, cost)
        quality = None
        if upgrade:
            upgraded = refine(snapshot, scores, targets, prediction, config, tier_bytes)
            cost[upgraded] = p[upgraded] * b.sensitivity[upgraded, 0]
    if quality is None or len(upgraded):
        quality = pairwise_sum(cost)
    return quality, price, upgraded


def _sorted_round(
    snapshot: Snapshot,
    scores: Scores,
    targets: Targets,
    prediction: Prediction,
    candidates: tuple[np.ndarray, ...],
    target: float,
    cost: np.ndarray,
    tier_bytes: np.ndarray,
    sticky: float,
    records: _Records,
    used: int,
) -> tuple[_Records, int, float, tuple[np.ndarray, ...], float, bool, bool]:
    """A quality-budget round whose choice ``choose_fixes`` found uncertain: the candidates
    chosen as the sorting code chose them (``searchsorted`` of the running saving in order),
    then fixed (``fix_round``, whose results it returns)."""
    b = snapshot.blocks
    contributors, current, fallback, saving, order_key, old_bytes, new_bytes = candidates
    order = stable_argsort(sort_keys(order_key))
    count = int(np.searchsorted(np.cumsum(saving[order]), target)) + 1
    chosen = np.zeros(len(order_key), dtype=bool)
    chosen[order[:count]] = True
    least_key = int(order_key[order[count:]].min()) if count < len(order) else _MAX
    # PERF: the round's bookkeeping compiled too (a dozen numpy calls before).
    result: tuple[_Records, int, float, tuple[np.ndarray, ...], float, bool, bool]
    result = fix_round(
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
        prediction.use_probability,
        b.sensitivity,
        scores.static.budget_fallback,
        b.nbytes,
        targets.hbm_encoding,
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
    return result


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
