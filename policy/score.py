"""Score and choose targets: which blocks sit in HBM at which encoding, and where the rest keep
their fallback copy.

Value of a block in HBM, in seconds of stall avoided per use window::

    uses = p * imminence + p * max(horizon - t_next, 0) / period,
    imminence = 1 / (1 + t_next / imminence_s)
    value(e) = uses * (recovery_s - decode_s(e)) - quality_weight_s * p * sensitivity(e)

where ``recovery_s`` is the time to fetch the block from its fallback copy (transfer over the
modeled link) or to regenerate it. Each HBM tier is filled (less its headroom) by value density
``value / bytes``, each block at its densest encoding; the precision floors and the quality budget
are not scoring's business but the veto's. Spare capacity left after the veto goes to precision
upgrades (:func:`refine`). Scoring proposes only encodings the block's floor allows. Warm tiers
(host, then CXL) are filled the same way with the value of
a faster fallback copy.

Values count the uses expected within ``hysteresis_horizon_s`` (the next, weighted by imminence,
and the later ones at the block's period). Hysteresis: a block that is not where the step would
put it pays a penalty of ``hysteresis_multiple`` times its transfer time per byte, so it displaces
a resident only if it gains more over the horizon than that multiple of the move's cost; a block
moved less than ``min_dwell_s`` ago stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy._fill import take_by_density as take_by_density_kernel
from policy._score_chain import score_and_choose as score_and_choose_kernel
from policy._score_kernels import (
    choose_fallback,
    choose_hbm,
    chosen_density,
    refine_precision,
    score_rows,
    weighted_preference,
)
from policy.config import PolicyConfig
from policy.predict import Prediction
from policy.snapshot import Snapshot
from policy.static import Rows, Static


@dataclass(frozen=True)
class Scores:
    static: Static
    used: np.ndarray  # [N] p(use) * imminence: the weight of the block's recovery time
    # [N] int8: densest encoding in HBM. PERF: int8 as ``Static.preferred_by_level`` holds it,
    # and no column of recovery times (its readers take ``Static.recovery_by_level``'s row by
    # the block's fallback level): ``score_rows`` writes 9 bytes a block, not 24. Captured
    # inputs, cold, alternating, 16,384 blocks: ``score_rows`` 0.203 -> 0.169 ms,
    # ``chosen_density`` 0.124 -> 0.140 ms (int8 alone: ``score_rows`` 0.194 -> 0.187 ms).
    preferred: np.ndarray
    preferred_density: np.ndarray  # [N] its value per byte
    # Its bytes: [4, N] per fallback level (row by the block's level), or [1, N] with a quality
    # weight (``choose_hbm``'s ``by_level``).
    preferred_nbytes: np.ndarray
    imminence: np.ndarray  # [N]
    use_probability: np.ndarray  # [N]
    pinned: np.ndarray  # [N] keeps its current HBM copy (leased, or within its dwell time)
    hbm_budget_bytes: np.ndarray  # [T] per tier, after headroom and reserved bytes
    quality_weight_s: float
    # [T] per tier, capacity less reserved bytes. PERF: the snapshot's property once a step,
    # not three times (two numpy calls each).
    usable_bytes: np.ndarray


@dataclass
class Targets:
    hbm_encoding: np.ndarray  # [N] NONE when not in HBM
    fallback_level: np.ndarray  # [N] HOST, CXL or STORAGE
    chosen_density: np.ndarray  # [N] value density of the chosen HBM option (for explanations)
    vetoed_out: np.ndarray  # [N] taken out of HBM by a veto rule, not by scoring
    quality_bound: np.ndarray  # [N] held at a precision the veto requires (floor or budget)


def take_by_density(
    density: np.ndarray, nbytes: np.ndarray, budget: float, rounds: int = 8
) -> np.ndarray:
    """Mask of the densest items whose bytes fit ``budget`` together: greedy by density (ties:
    the lower index first), an item too big for what is left is skipped and smaller ones after
    it still go, in at most ``rounds`` rounds (each takes the longest run that fits, then skips
    the item that did not).

    PERF: compiled, and by weighted selection instead of a sort (``policy._fill``,
    ``policy._select``): 14 ms against 150 ms for a million items (the numpy version sorted
    them all).
    """
    taken: np.ndarray = take_by_density_kernel(
        np.asarray(density, np.float64), np.asarray(nbytes, np.int64), float(budget), rounds
    )
    return taken


def score(
    snapshot: Snapshot, prediction: Prediction, static: Static, config: PolicyConfig
) -> Scores:
    b, tel = snapshot.blocks, snapshot.telemetry
    n = b.count
    used, preferred_density, imminence = (np.empty(n) for _ in range(3))
    preferred = np.empty(n, np.int8)
    pinned = np.empty(n, dtype=bool)
    # Uses within the horizon: the next one, weighted by imminence, and the later ones expected
    # at the block's period. A move is weighed against the value it earns over the horizon.
    # PERF: one compiled pass; without a quality weight the densest encoding depends on static
    # data and the fallback level only (cached in ``static``).
    score_rows(
        b.fallback_level,
        b.model,
        b.hbm_encoding,
        b.leased,
        b.placed_at_s,
        prediction.use_probability,
        prediction.time_to_next_use_s,
        prediction.period_s,
        static.recovery_by_level,
        static.preferred_by_level,
        static.unit_density_by_level,
        1.0 / config.imminence_s,
        config.hysteresis_horizon_s,
        float(tel.now_s),
        config.min_dwell_s,
        used,
        preferred,
        preferred_density,
        imminence,
        pinned,
    )
    preferred_nbytes = static.preferred_nbytes_by_level
    if config.quality_weight_s:
        preferred_nbytes = np.empty((1, n), np.int64)
        weighted_preference(
            used,
            b.fallback_level,
            static.recovery_by_level,
            static.decode_s,
            prediction.use_probability,
            b.sensitivity,
            b.nbytes,
            static.allowed,
            config.quality_weight_s,
            preferred,
            preferred_density,
            preferred_nbytes[0],
        )
    usable = snapshot.tiers.usable_bytes
    budget = usable * (1.0 - config.hbm_headroom_fraction)
    return Scores(
        static,
        used,
        preferred,
        preferred_density,
        preferred_nbytes,
        imminence,
        prediction.use_probability,
        pinned,
        budget,
        config.quality_weight_s,
        usable,
    )


def score_and_choose(
    snapshot: Snapshot, prediction: Prediction, static: Static, config: PolicyConfig
) -> tuple[Scores, Targets]:
    """``score`` then ``choose_targets``, the same results (bit for bit) from one compiled call.

    PERF: the step's four or five kernels and their glue in one call
    (``policy._score_chain``), not one by one from Python.
    """
    b, tel, tiers = snapshot.blocks, snapshot.telemetry, snapshot.tiers
    (
        used, preferred, preferred_density, preferred_nbytes, imminence, pinned, budget, usable,
        hbm, fallback, density, vetoed_out, quality_bound,
    ) = score_and_choose_kernel(
        b.fallback_level, b.model, b.hbm_encoding, b.leased, b.placed_at_s, b.demand,
        b.regenerable, b.nbytes, b.sensitivity, b.hbm_tier, b.host_tier, b.cxl_tier,
        tiers.capacity_bytes, tiers.reserved_bytes, snapshot.links.gbps,
        prediction.use_probability, prediction.time_to_next_use_s, prediction.period_s,
        static.recovery_by_level, static.preferred_by_level, static.unit_density_by_level,
        static.preferred_nbytes_by_level, static.decode_s, static.allowed, static.full_nbytes,
        static.decode_rate, static.per_byte_to_hbm_s, static.latency_to_hbm_s,
        static.hbm_group_tiers, static.host_group_tiers, static.cxl_group_tiers,
        _every_block(static.hbm_groups), _every_block(static.host_groups),
        _every_block(static.cxl_groups), 1.0 / config.imminence_s,
        config.hysteresis_horizon_s, float(tel.now_s), config.min_dwell_s,
        config.quality_weight_s, config.hysteresis_multiple, 1.0 - config.hbm_headroom_fraction,
    )  # fmt: skip
    scores = Scores(
        static, used, preferred, preferred_density, preferred_nbytes, imminence,
        prediction.use_probability, pinned, budget, config.quality_weight_s, usable,
    )  # fmt: skip
    return scores, Targets(hbm, fallback, density, vetoed_out, quality_bound)


def _every_block(groups: tuple[tuple[int, Rows], ...]) -> bool:
    """One tier holds every block (``Static``'s groups: its rows are ``slice(None)``)."""
    return len(groups) == 1 and isinstance(groups[0][1], slice)


def choose_targets(snapshot: Snapshot, scores: Scores, config: PolicyConfig) -> Targets:
    """Target placement before the veto (see the module docstring)."""
    b, tel, static = snapshot.blocks, snapshot.telemetry, scores.static
    per_byte = static.per_byte_to_hbm_s
    hbm, hbm_nbytes = choose_hbm(
        b.hbm_tier,
        b.hbm_encoding,
        b.fallback_level,
        b.placed_at_s,
        b.demand,
        scores.pinned,
        b.nbytes,
        static.full_nbytes,
        scores.preferred,
        scores.preferred_nbytes,
        len(scores.preferred_nbytes) > 1,
        scores.preferred_density,
        config.hysteresis_multiple * per_byte,
        static.hbm_group_tiers,
        _every_block(static.hbm_groups),
        scores.hbm_budget_bytes,
        float(tel.now_s),
        config.min_dwell_s,
        8,
    )
    density = chosen_density(
        hbm,
        hbm_nbytes,
        static.full_nbytes,
        scores.used,
        b.fallback_level,
        static.recovery_by_level,
        static.decode_rate,
        scores.use_probability,
        b.sensitivity,
        scores.quality_weight_s,
    )
    fallback = _choose_fallback(snapshot, scores, config)
    n = b.count
    return Targets(hbm, fallback, density, np.zeros(n, dtype=bool), np.zeros(n, dtype=bool))


def _choose_fallback(snapshot: Snapshot, scores: Scores, config: PolicyConfig) -> np.ndarray:
    """Host, then CXL, by the value of a faster fallback copy; storage for the rest. Leased
    fallback copies stay where they are. The value per byte of a copy here rather than in
    storage is the recovery time it saves, less ``hysteresis_multiple`` times the copy's cost
    for a block not already there."""
    b = snapshot.blocks
    per_byte, latency = scores.static.per_byte_to_hbm_s, scores.static.latency_to_hbm_s
    # PERF: the copies' costs in the kernel (a dozen numpy scalar operations before).
    fallback: np.ndarray = choose_fallback(
        b.fallback_level,
        b.leased,
        b.regenerable,
        scores.static.full_nbytes,  # PERF: not a strided column (1M blocks: 20.7 -> 18.2 ms)
        scores.imminence,
        b.host_tier,
        b.cxl_tier,
        scores.static.host_group_tiers,
        scores.static.cxl_group_tiers,
        _every_block(scores.static.host_groups),
        _every_block(scores.static.cxl_groups),
        per_byte,
        latency,
        snapshot.links.gbps,
        config.hysteresis_multiple,
        scores.usable_bytes,
        8,
    )
    return fallback


def refine(
    snapshot: Snapshot,
    scores: Scores,
    targets: Targets,
    prediction: Prediction,
    config: PolicyConfig,
    held_bytes: np.ndarray,
) -> np.ndarray:
    """Spend HBM left after the veto on precision: upgrade blocks to full precision in order of
    quality and decode time saved per extra byte (in place on ``targets``; ``held_bytes``: per
    tier, the bytes of the HBM copies ``targets`` holds, the veto's ``tier_bytes``). Returns
    the blocks upgraded.

    With ``config.precision_hysteresis``, precision obeys the placement's hysteresis: a block
    within its dwell time keeps its encoding; the decode time saved counts the uses within the
    horizon; and a block not at full precision in HBM now pays ``hysteresis_multiple`` times
    its transfer time per byte, so the blocks already at full precision keep the spare room
    unless another gains clearly more. Without it the upgrades follow the next use's
    imminence, and the upgraded set turns with the layer schedule (a move each way per block
    per pass through the model, measured on the main job: experts flipping between INT4 and
    full every few forwards)."""
    b = snapshot.blocks
    upgraded: np.ndarray = refine_precision(
        targets.hbm_encoding,
        b.hbm_tier,
        b.leased,
        b.nbytes,
        b.sensitivity,
        scores.static.decode_rate,
        prediction.use_probability,
        scores.imminence,
        scores.static.hbm_group_tiers,
        _every_block(scores.static.hbm_groups),
        scores.static.least_upgrade_nbytes,
        scores.hbm_budget_bytes,
        held_bytes,
        8,
        config.precision_hysteresis,
        scores.used,
        b.hbm_encoding,
        scores.pinned,
        b.fallback_level,
        config.hysteresis_multiple * scores.static.per_byte_to_hbm_s,
    )
    return upgraded
