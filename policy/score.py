"""Score and choose targets: which blocks sit in HBM at which encoding, and where the rest keep
their fallback copy.

Value of a block in HBM, in seconds of stall avoided per use window::

    benefit = p(use) * recovery_s * imminence,    imminence = 1 / (1 + t_next / imminence_s)
    value(e) = benefit - p * imminence * decode_s(e) - quality_weight_s * p * sensitivity(e)

where ``recovery_s`` is the time to fetch the block from its fallback copy (transfer over the
modeled link) or to regenerate it. Each HBM tier is filled (less its headroom) by value density
``value / bytes``, each block at its densest encoding; the precision floors and the quality budget
are not scoring's business but the veto's. Spare capacity left after the veto goes to precision
upgrades (:func:`refine`). Warm tiers (host, then CXL) are filled the same way with the value of
a faster fallback copy.

Hysteresis: a block that is not where the step would put it pays a penalty of
``hysteresis_multiple`` times its transfer time per byte, so it displaces a resident only if it
gains more than that multiple of its cost; a block moved less than ``min_dwell_s`` ago stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy.config import PolicyConfig
from policy.predict import Prediction
from policy.snapshot import CXL, HBM, HOST, NONE, STORAGE, Snapshot


@dataclass(frozen=True)
class Scores:
    value_s: np.ndarray  # [N, E] value of HBM residency at each encoding
    density: np.ndarray  # [N, E] value per byte
    preferred: np.ndarray  # [N] densest encoding
    imminence: np.ndarray  # [N]
    decode_s: np.ndarray  # [N, E]
    pinned: np.ndarray  # [N] keeps its current HBM copy (leased, or within its dwell time)
    hbm_budget_bytes: np.ndarray  # [T] per tier, after headroom and reserved bytes


@dataclass
class Targets:
    hbm_encoding: np.ndarray  # [N] NONE when not in HBM
    fallback_level: np.ndarray  # [N] HOST, CXL or STORAGE
    chosen_density: np.ndarray  # [N] value density of the chosen HBM option (for explanations)


def take_by_density(density: np.ndarray, nbytes: np.ndarray, budget: float) -> np.ndarray:
    """Mask of the densest items whose bytes fit ``budget`` together (greedy prefix)."""
    if nbytes.sum() <= budget:
        return np.ones(len(density), dtype=bool)
    order = np.argsort(-density, kind="stable")
    fits = np.cumsum(nbytes[order]) <= budget
    taken = np.zeros(len(density), dtype=bool)
    taken[order[fits]] = True
    return taken


def score(snapshot: Snapshot, prediction: Prediction, config: PolicyConfig) -> Scores:
    b, links, tel = snapshot.blocks, snapshot.links, snapshot.telemetry
    full_bytes = b.nbytes[:, 0]
    recovery_s = links.seconds(b.fallback_level, HBM, full_bytes)
    regenerate_s = full_bytes / (links.regenerate_gbps * 1e9)
    recovery_s = np.where(b.regenerable, np.minimum(recovery_s, regenerate_s), recovery_s)
    p = prediction.use_probability
    imminence = 1.0 / (1.0 + prediction.time_to_next_use_s / config.imminence_s)
    decode_gbps = snapshot.encodings.decode_gbps
    decode_s = np.where(
        np.isinf(decode_gbps)[None, :], 0.0, full_bytes[:, None] / (decode_gbps[None, :] * 1e9)
    )
    used = p * imminence
    value = (used * recovery_s)[:, None] - used[:, None] * decode_s
    if config.quality_weight_s:
        value -= config.quality_weight_s * p[:, None] * b.sensitivity
    density = value / b.nbytes
    preferred = np.argmax(density, axis=1)
    recent = (tel.now_s - b.placed_at_s) < config.min_dwell_s
    pinned = (b.hbm_encoding != NONE) & (b.leased | recent)
    budget = snapshot.tiers.usable_bytes * (1.0 - config.hbm_headroom_fraction)
    return Scores(value, density, preferred, imminence, decode_s, pinned, budget)


def choose_targets(snapshot: Snapshot, scores: Scores, config: PolicyConfig) -> Targets:
    """Target placement before the veto (see the module docstring)."""
    b, tel = snapshot.blocks, snapshot.telemetry
    n = b.count
    rows = np.arange(n)
    hbm = np.full(n, NONE, dtype=np.int64)
    chosen_density = np.zeros(n)
    resident = b.hbm_encoding != NONE
    recently_left = ~resident & ((tel.now_s - b.placed_at_s) < config.min_dwell_s)
    move_s_per_byte = (
        snapshot.links.seconds(b.fallback_level, HBM, np.ones(n))
        - (snapshot.links.latency_s[b.fallback_level, HBM])
    )
    penalty = np.where(resident, 0.0, config.hysteresis_multiple * move_s_per_byte)
    preferred_density = scores.density[rows, scores.preferred] - penalty
    preferred_bytes = b.nbytes[rows, scores.preferred]
    for tier in np.unique(b.hbm_tier):
        in_tier = b.hbm_tier == tier
        pinned = in_tier & scores.pinned
        hbm[pinned] = b.hbm_encoding[pinned]
        room = scores.hbm_budget_bytes[tier] - b.nbytes[pinned, b.hbm_encoding[pinned]].sum()
        candidates = np.flatnonzero(in_tier & ~scores.pinned & (~recently_left | b.demand))
        full_bytes = b.nbytes[candidates, 0]
        if full_bytes.sum() <= room:  # everything fits at full precision: no trade-off to make
            hbm[candidates] = 0
            continue
        density = np.where(b.demand[candidates], np.inf, preferred_density[candidates])
        taken = take_by_density(density, preferred_bytes[candidates], max(room, 0.0))
        chosen = candidates[taken]
        hbm[chosen] = scores.preferred[chosen]
    in_hbm = hbm != NONE
    chosen_density[in_hbm] = scores.density[rows[in_hbm], hbm[in_hbm]]
    fallback = _choose_fallback(snapshot, scores, config)
    return Targets(hbm, fallback, chosen_density)


def _choose_fallback(snapshot: Snapshot, scores: Scores, config: PolicyConfig) -> np.ndarray:
    """Host, then CXL, by the value of a faster fallback copy; storage for the rest."""
    b, links = snapshot.blocks, snapshot.links
    n = b.count
    fallback = np.full(n, STORAGE, dtype=np.int64)
    full_bytes = b.nbytes[:, 0].astype(np.float64)
    from_storage = links.seconds(np.full(n, STORAGE), HBM, full_bytes)
    # Leased fallback copies stay where they are.
    keep = b.leased & (b.fallback_level != STORAGE)
    fallback[keep] = b.fallback_level[keep]
    free = ~keep & ~b.regenerable
    usable = snapshot.tiers.usable_bytes
    for level, tier_of in ((HOST, b.host_tier), (CXL, b.cxl_tier)):
        gain = from_storage - links.seconds(np.full(n, level), HBM, full_bytes)
        value = scores.imminence * gain / full_bytes
        gbps = links.gbps[STORAGE, level]
        copy_s_per_byte = 1.0 / (gbps * 1e9) if gbps > 0 else np.inf
        here = b.fallback_level == level
        value = np.where(here, value, value - config.hysteresis_multiple * copy_s_per_byte)
        for tier in np.unique(tier_of[free & (tier_of != NONE)]):
            pinned = keep & (tier_of == tier) & (fallback == level)
            room = usable[tier] - full_bytes[pinned].sum()
            candidates = np.flatnonzero(free & (tier_of == tier) & (fallback == STORAGE))
            taken = take_by_density(value[candidates], full_bytes[candidates], max(room, 0.0))
            fallback[candidates[taken]] = level
    return fallback


def refine(snapshot: Snapshot, scores: Scores, targets: Targets, prediction: Prediction) -> None:
    """Spend HBM left after the veto on precision: upgrade blocks to full precision in order of
    quality and decode time saved per extra byte (in place on ``targets``)."""
    b = snapshot.blocks
    rows = np.arange(b.count)
    hbm = targets.hbm_encoding
    in_hbm = hbm != NONE
    for tier in np.unique(b.hbm_tier):
        in_tier = b.hbm_tier == tier
        used = b.nbytes[rows[in_tier & in_hbm], hbm[in_tier & in_hbm]].sum()
        room = scores.hbm_budget_bytes[tier] - used
        candidates = np.flatnonzero(in_tier & in_hbm & (hbm != 0) & ~b.leased)
        if room <= 0 or not len(candidates):
            continue
        current = hbm[candidates]
        extra = b.nbytes[candidates, 0] - b.nbytes[candidates, current]
        p = prediction.use_probability[candidates]
        quality_gain = p * b.sensitivity[candidates, current]
        decode_gain = p * scores.imminence[candidates] * scores.decode_s[candidates, current]
        gain = (quality_gain + decode_gain) / np.maximum(extra, 1)
        taken = take_by_density(gain, np.maximum(extra, 0), room)
        hbm[candidates[taken]] = 0
