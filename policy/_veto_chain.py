"""The veto's kernels called in turn from compiled functions (``policy.veto``).

``enter`` runs the entry pass (``veto_entry``); ``budget_round`` one round of the quality budget
(``compact_candidates`` where the round before left its candidates to compact, ``choose_fixes``
and, where the choice is certain, ``fix_round``); ``guard_and_refine`` the capacity guard's
test and, where no tier is above its budget, the precision upgrades (``refine_precision``, as
``policy.score.refine`` calls it) and their quality costs. ``veto_rules`` calls them in turn,
with the sums of the cost between the rounds (numpy's pairwise sum: ``policy._sum``), and makes
the rejection columns; it stops where a rare case needs Python (``policy._veto_resume``). The
kernels are unchanged; what they hand each other stays in compiled code.

PERF: each return from a kernel to Python found the interpreter's data evicted by the kernel
before, and each call unboxed its arguments again (``fix_round`` takes 25); the step's veto
phase made four kernel calls, two sums and the bookkeeping between them in Python. ``python
bench/policy_ab.py --base 1f8c9c1 --sizes 1000,16384 --steps 300`` (load 1.7): 16,384 blocks
median step ratio 0.968 (veto phase 0.599 -> 0.545 ms), 1,000 blocks 0.950 (0.119 -> 0.100);
with three compiled calls and the sums in Python (``enter``, ``budget_round``,
``guard_and_refine``), 0.984 (0.734 -> 0.730 ms, load 2.9) and 0.937 (0.165 -> 0.163).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba.core import types
from numba.experimental import structref

from policy._score_kernels import refine_precision
from policy._select import _jit
from policy._sum import pairwise_sum
from policy._veto_budget import choose_fixes, fix_round
from policy._veto_candidates import compact_candidates
from policy._veto_kernels import veto_entry

FIXED = 0  # ``budget_round``: the round fixed its choice
NO_CANDIDATES = 1  # no candidate is left: the loop ends
UNCERTAIN = 2  # the choice is not certain: the caller sorts, then calls ``fix_round``
DONE = 0  # ``veto_rules``: the rules applied (but the capacity guard's, where a tier is over)
FORBIDDEN = 3  # a proposal breaks a floor or an unknown sensitivity: the caller goes on


@_jit
def enter(
    leased: np.ndarray,
    hbm_encoding: np.ndarray,
    hbm: np.ndarray,
    allowed: np.ndarray,
    hbm_tier: np.ndarray,
    nbytes: np.ndarray,
    use_probability: np.ndarray,
    sensitivity: np.ndarray,
    budget_fallback: np.ndarray,
    n_tiers: int,
    sticky: float,
) -> tuple[
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    tuple[np.ndarray, ...],
    float,
    bool,
]:
    """``veto_entry``, with the encodings the restored leased rows are restored to (their
    ``hbm_encoding``) after the rows and what was proposed for them."""
    rows, proposed, protected, bad, tier_bytes, cost, first, total, valid = veto_entry(
        leased, hbm_encoding, hbm, allowed, hbm_tier, nbytes, use_probability, sensitivity,
        budget_fallback, n_tiers, sticky,
    )  # fmt: skip
    restored = np.empty(len(rows), hbm_encoding.dtype)
    for i in range(len(rows)):
        restored[i] = hbm_encoding[rows[i]]
    return rows, proposed, restored, protected, bad, tier_bytes, cost, first, total, valid


@_jit
def budget_round(
    target: float,
    compacted: bool,
    candidates: tuple[np.ndarray, ...],
    total: float,
    valid: bool,
    cost: np.ndarray,
    use_probability: np.ndarray,
    sensitivity: np.ndarray,
    budget_fallback: np.ndarray,
    nbytes: np.ndarray,
    hbm: np.ndarray,
    hbm_tier: np.ndarray,
    chosen_density: np.ndarray,
    budget_bytes: np.ndarray,
    tier_bytes: np.ndarray,
    vetoed_out: np.ndarray,
    quality_bound: np.ndarray,
    held: np.ndarray,
    sticky: float,
    records: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    used: int,
) -> tuple[
    int,
    tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    int,
    float,
    tuple[np.ndarray, ...],
    float,
    bool,
    bool,
]:
    """One round of the quality budget: the candidates (compacted first unless ``compacted``)
    whose fix saves ``target`` (``choose_fixes``), fixed (``fix_round``). Returns ``FIXED``
    and ``fix_round``'s results; or ``NO_CANDIDATES`` or ``UNCERTAIN`` with the records, the
    (compacted) candidates, their sum and flag as they are, no price (``inf``) and True: the
    caller ends the loop, or sorts the candidates and calls ``fix_round`` itself."""
    if not compacted:
        candidates, total, valid = compact_candidates(
            cost, hbm, budget_fallback, use_probability, sensitivity, nbytes, held, sticky,
            candidates[0], candidates[1], candidates[2], candidates[3], candidates[4],
            candidates[5], candidates[6],
        )  # fmt: skip
    rows, current, fallback, saving, order_key, old_bytes, new_bytes = candidates
    if not len(rows):
        return NO_CANDIDATES, records, used, np.inf, candidates, total, valid, True
    chosen, certain, least_key = choose_fixes(order_key, saving, total, valid, target)
    if not certain:
        return UNCERTAIN, records, used, np.inf, candidates, total, valid, True
    records, used, price, candidates, total, valid, compacted = fix_round(
        rows, current, fallback, saving, order_key, old_bytes, new_bytes, chosen, least_key,
        cost, use_probability, sensitivity, budget_fallback, nbytes, hbm, hbm_tier,
        chosen_density, budget_bytes, tier_bytes, vetoed_out, quality_bound, held, sticky,
        records, used,
    )  # fmt: skip
    return FIXED, records, used, price, candidates, total, valid, compacted


@_jit
def guard_and_refine(
    tier_bytes: np.ndarray,
    budget_bytes: np.ndarray,
    upgrade: bool,
    hbm: np.ndarray,
    hbm_tier: np.ndarray,
    leased: np.ndarray,
    nbytes: np.ndarray,
    sensitivity: np.ndarray,
    decode_rate: np.ndarray,
    use_probability: np.ndarray,
    imminence: np.ndarray,
    hbm_tiers: np.ndarray,
    every_block: bool,
    least_upgrade_nbytes: np.ndarray,
    hysteresis: bool,
    used: np.ndarray,
    current: np.ndarray,
    pinned: np.ndarray,
    fallback_level: np.ndarray,
    hysteresis_multiple: float,
    per_byte_to_hbm_s: np.ndarray,
    cost: np.ndarray,
) -> tuple[bool, np.ndarray]:
    """Whether an HBM tier (of ``hbm_tiers``) holds more than its budget (the capacity guard's
    test); where none does and ``upgrade``, the precision upgrades (``refine_precision``, as
    ``policy.score.refine`` calls it), the ``cost`` of each block upgraded made its
    ``p(use) * sensitivity`` at full precision. Returns that and the blocks upgraded."""
    upgraded = np.empty(0, np.int64)
    for tier in hbm_tiers:
        if tier_bytes[tier] > budget_bytes[tier]:
            return True, upgraded
    if not upgrade:
        return False, upgraded
    upgraded = refine_precision(
        hbm, hbm_tier, leased, nbytes, sensitivity, decode_rate, use_probability, imminence,
        hbm_tiers, every_block, least_upgrade_nbytes, budget_bytes, tier_bytes, 8, hysteresis,
        used, current, pinned, fallback_level, hysteresis_multiple * per_byte_to_hbm_s,
    )  # fmt: skip
    for r in upgraded:
        cost[r] = use_probability[r] * sensitivity[r, 0]
    return False, upgraded


@_jit
def rejection_columns(
    leased: tuple[np.ndarray, np.ndarray, np.ndarray],
    leased_code: int,
    records: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    used: int,
    budget_code: int,
    quality_budget: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The six rejection columns (``policy.veto.Rejections.arrays``) of the lease rule's batch
    (``leased``: its rows, what was proposed for them and their encodings restored; value 1,
    limit 0) followed by the quality budget's (the ``used`` first ``records``). A batch alone is
    not copied, as ``Rejections.arrays`` does not copy it (a million budget rejections at a
    million blocks)."""
    rows, proposed, restored = leased
    fixed, before, placed, cost_before = records
    n = len(rows)
    if not n:
        return (
            fixed[:used], np.full(used, budget_code, np.int8), before[:used], placed[:used],
            cost_before[:used], np.full(used, quality_budget),
        )  # fmt: skip
    size = n + used
    block = np.empty(size, np.int64)
    rule = np.empty(size, np.int8)
    was = np.empty(size, np.int64)
    now = np.empty(size, np.int64)
    value = np.empty(size, np.float64)
    limit = np.empty(size, np.float64)
    for i in range(n):
        block[i], rule[i], was[i], now[i] = rows[i], leased_code, proposed[i], restored[i]
        value[i], limit[i] = 1.0, 0.0
    for i in range(used):
        j = n + i
        block[j], rule[j], was[j], now[j] = fixed[i], budget_code, before[i], placed[i]
        value[j], limit[j] = cost_before[i], quality_budget
    return block, rule, was, now, value, limit


@structref.register
class _StoppedType(types.StructRef):
    def preprocess_fields(self, fields: tuple) -> tuple:  # type: ignore[type-arg]
        return tuple((name, types.unliteral(kind)) for name, kind in fields)  # type: ignore[no-untyped-call]


class Stopped(structref.StructRefProxy):
    """Where ``veto_rules`` stopped, for Python to go on from (``policy._veto_resume``): read
    through ``stopped_state``. PERF: one object to box, where the 16 arrays it holds took 0.4
    to 0.65 us each to box (``veto_rules`` returned them at every step; timeit, warm). With
    the sum then called back to numpy in object mode: ``python bench/policy_ab.py --base
    74c16be --sizes 1000,16384 --steps 200`` (load 1.9), 16,384 blocks 0.965 (veto 0.575 ->
    0.544 ms), 1,000 blocks 0.968 (0.108 -> 0.098)."""


structref.define_proxy(  # type: ignore[no-untyped-call]
    Stopped,
    _StoppedType,
    [
        "rounds",
        "lease_batch",
        "protected",
        "bad",
        "candidates",
        "total",
        "valid",
        "records",
        "used",
    ],
)


@_jit
def stopped_state(
    stopped: Any,  # a ``Stopped``: its fields are known in compiled code only
) -> tuple[
    int,
    tuple[np.ndarray, np.ndarray, np.ndarray],
    np.ndarray,
    np.ndarray,
    tuple[np.ndarray, ...],
    float,
    bool,
    tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    int,
]:
    """What ``veto_rules`` stopped at: the rounds done, the lease rule's rows (with what was
    proposed for them and their encodings restored), the protected mask, the rows rule 2
    forbids, the candidates with their sum and flag, the budget's records and how many are
    used."""
    s = stopped
    return (
        s.rounds,
        s.lease_batch,
        s.protected,
        s.bad,
        s.candidates,
        s.total,
        s.valid,
        s.records,
        s.used,
    )


@_jit
def veto_rules(
    leased: np.ndarray,
    hbm_encoding: np.ndarray,
    hbm: np.ndarray,
    allowed: np.ndarray,
    hbm_tier: np.ndarray,
    nbytes: np.ndarray,
    use_probability: np.ndarray,
    sensitivity: np.ndarray,
    budget_fallback: np.ndarray,
    sticky: float,
    chosen_density: np.ndarray,
    budget_bytes: np.ndarray,
    vetoed_out: np.ndarray,
    quality_bound: np.ndarray,
    quality_budget: float,
    max_rounds: int,
    upgrade: bool,
    decode_rate: np.ndarray,
    imminence: np.ndarray,
    hbm_tiers: np.ndarray,
    every_block: bool,
    least_upgrade_nbytes: np.ndarray,
    hysteresis: bool,
    used: np.ndarray,
    pinned: np.ndarray,
    fallback_level: np.ndarray,
    hysteresis_multiple: float,
    per_byte_to_hbm_s: np.ndarray,
    leased_code: int,
    budget_code: int,
) -> tuple:  # type: ignore[type-arg]
    """The veto's rules in one call, as ``policy.veto`` applies them one by one: ``enter``,
    the quality budget's rounds (``budget_round``, at most ``max_rounds``, each after the sum
    of the cost that decides it: ``pairwise_sum``), ``guard_and_refine``. Stops where
    Python goes on (``policy._veto_resume``): ``FORBIDDEN`` after the entry when a proposal
    breaks rule 2, ``UNCERTAIN`` at a round whose choice is not certain (before it), or
    ``DONE`` with a tier over its budget (before the upgrades).

    Returns the status, the quality cost (the sum of ``cost`` where done and no tier is over,
    NaN otherwise), the budget's price, whether a tier is over, each tier's bytes, each block's
    cost, the blocks upgraded, the rejection columns (``rejection_columns``; meaningless unless
    done with no tier over) and the rest of the state (``Stopped``)."""
    rows, proposed, restored, protected, bad, tier_bytes, cost, candidates, total, valid = enter(
        leased, hbm_encoding, hbm, allowed, hbm_tier, nbytes, use_probability, sensitivity,
        budget_fallback, len(budget_bytes), sticky,
    )  # fmt: skip
    records = (
        np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0),
    )  # fmt: skip
    n_records = 0
    price = np.inf
    quality = np.nan  # the cost's sum where the loop ended on it, unchanged since
    status = DONE
    rounds = 0
    compacted = True
    while not len(bad) and rounds < max_rounds:
        total_cost = pairwise_sum(cost)
        excess = total_cost - quality_budget
        if excess <= 1e-15:
            quality = total_cost
            break
        outcome, records, n_records, round_price, candidates, total, valid, compacted = (
            budget_round(
                excess - 1e-15, compacted, candidates, total, valid, cost, use_probability,
                sensitivity, budget_fallback, nbytes, hbm, hbm_tier, chosen_density,
                budget_bytes, tier_bytes, vetoed_out, quality_bound, hbm_encoding, sticky,
                records, n_records,
            )
        )  # fmt: skip
        if outcome == NO_CANDIDATES:
            break
        if outcome == UNCERTAIN:
            status = UNCERTAIN
            break
        price = round_price
        rounds += 1
    if len(bad):
        status = FORBIDDEN
    over = False
    upgraded = np.empty(0, np.int64)
    columns = rejection_columns(
        (rows, proposed, restored), leased_code, records, n_records, budget_code, quality_budget
    )
    if status == DONE:
        over, upgraded = guard_and_refine(
            tier_bytes, budget_bytes, upgrade, hbm, hbm_tier, leased, nbytes, sensitivity,
            decode_rate, use_probability, imminence, hbm_tiers, every_block,
            least_upgrade_nbytes, hysteresis, used, hbm_encoding, pinned, fallback_level,
            hysteresis_multiple, per_byte_to_hbm_s, cost,
        )  # fmt: skip
        if over:
            quality = np.nan
        elif np.isnan(quality) or len(upgraded):
            quality = pairwise_sum(cost)
    stopped = Stopped(  # type: ignore[no-untyped-call]
        rounds, (rows, proposed, restored), protected, bad, candidates, total, valid, records,
        n_records,
    )  # fmt: skip
    return status, quality, price, over, tier_bytes, cost, upgraded, columns, stopped
