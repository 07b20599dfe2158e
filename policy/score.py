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

from policy.config import PolicyConfig
from policy.predict import Prediction
from policy.snapshot import CXL, HBM, HOST, NONE, STORAGE, Snapshot
from policy.static import Static


@dataclass(frozen=True)
class Scores:
    static: Static
    used: np.ndarray  # [N] p(use) * imminence: the weight of the block's recovery time
    recovery_s: np.ndarray  # [N] from its current fallback copy
    preferred: np.ndarray  # [N] densest encoding in HBM
    preferred_density: np.ndarray  # [N] its value per byte
    imminence: np.ndarray  # [N]
    use_probability: np.ndarray  # [N]
    pinned: np.ndarray  # [N] keeps its current HBM copy (leased, or within its dwell time)
    hbm_budget_bytes: np.ndarray  # [T] per tier, after headroom and reserved bytes
    quality_weight_s: float

    def density(self, snapshot: Snapshot, rows: np.ndarray, encoding: np.ndarray) -> np.ndarray:
        """Value per byte of ``rows`` in HBM at ``encoding`` (one encoding per row)."""
        b = snapshot.blocks
        value = self.used[rows] * (self.recovery_s[rows] - self.static.decode_s[rows, encoding])
        if self.quality_weight_s:
            quality = self.use_probability[rows] * b.sensitivity[rows, encoding]
            value -= self.quality_weight_s * quality
        density: np.ndarray = value / b.nbytes[rows, encoding]
        return density


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
    """Mask of the densest items whose bytes fit ``budget`` together: greedy by density, an item
    too big for what is left is skipped and smaller ones after it still go (in a few vectorized
    rounds rather than one item at a time)."""
    taken = np.zeros(len(density), dtype=bool)
    if nbytes.sum() <= budget:
        taken[:] = True
        return taken
    if budget <= 0:
        return taken
    # PERF: what cannot fit at all is never taken, so it is left out of the sort: in refine()
    # at a million blocks that keeps 460,000 candidates out of a 40 ms sort.
    order = np.flatnonzero(nbytes <= budget)
    # Ties: the lower row first. PERF: densities come in long runs of equal values (a layer's
    # blocks), where numpy's stable sort beats a default sort plus ordering the ties: 13 ms
    # against 54 ms for a million candidates of 7,661 distinct densities.
    order = order[np.argsort(-density[order], kind="stable")]
    left = float(budget)
    for _ in range(rounds):
        order = order[nbytes[order] <= left]  # what cannot fit at all is skipped
        if not len(order):
            break
        cum = np.cumsum(nbytes[order])
        fits = cum <= left
        count = int(fits.sum())  # a prefix, since cum grows
        taken[order[:count]] = True
        left -= float(cum[count - 1]) if count else 0.0
        order = order[count + 1 :]  # the first that did not fit is skipped
    return taken


def _per_byte_s(snapshot: Snapshot, destination: int) -> tuple[np.ndarray, np.ndarray]:
    """Per source level: seconds per byte and latency of its link to ``destination``."""
    gbps = snapshot.links.gbps[:, destination]
    with np.errstate(divide="ignore"):
        per_byte = np.where(gbps > 0, 1.0 / (gbps * 1e9), np.inf)
    return per_byte, snapshot.links.latency_s[:, destination]


def score(
    snapshot: Snapshot, prediction: Prediction, static: Static, config: PolicyConfig
) -> Scores:
    b, tel = snapshot.blocks, snapshot.telemetry
    rows = np.arange(b.count)
    recovery_s = static.recovery_by_level[b.fallback_level, rows]
    p = prediction.use_probability
    t_next = prediction.time_to_next_use_s
    imminence = 1.0 / (1.0 + t_next * (1.0 / config.imminence_s))
    # Uses within the horizon: the next one, weighted by imminence, and the later ones expected
    # at the block's period. A move is weighed against the value it earns over the horizon.
    period = prediction.period_s[b.model]
    later = p * np.maximum(config.hysteresis_horizon_s - t_next, 0.0) / period
    used = p * imminence + later
    if config.quality_weight_s:
        value = (used * recovery_s)[:, None] - used[:, None] * static.decode_s
        value -= config.quality_weight_s * p[:, None] * b.sensitivity
        density = np.where(static.allowed, value / b.nbytes, -np.inf)
        preferred = np.argmax(density, axis=1)
        preferred_density = density[rows, preferred]
    else:
        # PERF: without a quality weight the densest encoding depends on static data and the
        # fallback level only (cached): score() at 16,384 blocks took 0.35 ms instead of 0.99 ms.
        preferred = static.preferred_by_level[b.fallback_level, rows]
        preferred_density = used * static.unit_density_by_level[b.fallback_level, rows]
    pinned = (b.hbm_encoding != NONE) & (
        b.leased | ((tel.now_s - b.placed_at_s) < config.min_dwell_s)
    )
    budget = snapshot.tiers.usable_bytes * (1.0 - config.hbm_headroom_fraction)
    return Scores(
        static,
        used,
        recovery_s,
        preferred,
        preferred_density,
        imminence,
        p,
        pinned,
        budget,
        config.quality_weight_s,
    )


def choose_targets(snapshot: Snapshot, scores: Scores, config: PolicyConfig) -> Targets:
    """Target placement before the veto (see the module docstring)."""
    b, tel = snapshot.blocks, snapshot.telemetry
    n = b.count
    rows = np.arange(n)
    hbm = np.full(n, NONE, dtype=np.int64)
    resident = b.hbm_encoding != NONE
    per_byte, _ = _per_byte_s(snapshot, HBM)
    penalty = np.where(resident, 0.0, config.hysteresis_multiple * per_byte[b.fallback_level])
    preferred_density = scores.preferred_density - penalty
    preferred_bytes = b.nbytes[rows, scores.preferred]
    recently_left = ~resident & ((tel.now_s - b.placed_at_s) < config.min_dwell_s)
    eligible = ~scores.pinned & (~recently_left | b.demand)
    pinned_rows = np.flatnonzero(scores.pinned)
    hbm[pinned_rows] = b.hbm_encoding[pinned_rows]
    pinned_bytes = np.bincount(
        b.hbm_tier[pinned_rows],
        weights=b.nbytes[pinned_rows, b.hbm_encoding[pinned_rows]],
        minlength=len(scores.hbm_budget_bytes),
    )
    for tier, group in scores.static.hbm_groups:
        room = scores.hbm_budget_bytes[tier] - pinned_bytes[tier]
        candidates = rows[group][eligible[group]]
        if scores.static.full_bytes[candidates].sum() <= room:  # all fit at full: no trade-off
            hbm[candidates] = 0
            continue
        density = np.where(b.demand[candidates], np.inf, preferred_density[candidates])
        taken = take_by_density(density, preferred_bytes[candidates], room)
        chosen = candidates[taken]
        hbm[chosen] = scores.preferred[chosen]
    in_hbm = np.flatnonzero(hbm != NONE)
    chosen_density = np.zeros(n)
    chosen_density[in_hbm] = scores.density(snapshot, in_hbm, hbm[in_hbm])
    fallback = _choose_fallback(snapshot, scores, config)
    return Targets(hbm, fallback, chosen_density, np.zeros(n, dtype=bool), np.zeros(n, dtype=bool))


def _choose_fallback(snapshot: Snapshot, scores: Scores, config: PolicyConfig) -> np.ndarray:
    """Host, then CXL, by the value of a faster fallback copy; storage for the rest."""
    b = snapshot.blocks
    n = b.count
    rows = np.arange(n)
    fallback = np.full(n, STORAGE, dtype=np.int64)
    full = scores.static.full_bytes
    per_byte, latency = _per_byte_s(snapshot, HBM)
    # Leased fallback copies stay where they are.
    keep = b.leased & (b.fallback_level != STORAGE)
    fallback[keep] = b.fallback_level[keep]
    free = ~keep & ~b.regenerable
    usable = snapshot.tiers.usable_bytes
    for level, groups in ((HOST, scores.static.host_groups), (CXL, scores.static.cxl_groups)):
        if not groups:
            continue
        # Value per byte of a copy here rather than in storage: the recovery time it saves.
        saved_per_byte = (per_byte[STORAGE] - per_byte[level]) + (
            latency[STORAGE] - latency[level]
        ) / full
        gbps = snapshot.links.gbps[STORAGE, level]
        copy_cost = config.hysteresis_multiple / (gbps * 1e9) if gbps > 0 else np.inf
        value = scores.imminence * saved_per_byte - np.where(
            b.fallback_level == level, 0.0, copy_cost
        )
        for tier, group in groups:
            candidates = rows[group][(free & (fallback == STORAGE))[group]]
            pinned = keep[group] & (fallback[group] == level)
            room = usable[tier] - full[group][pinned].sum()
            taken = take_by_density(value[candidates], full[candidates], room)
            fallback[candidates[taken]] = level
    return fallback


def refine(snapshot: Snapshot, scores: Scores, targets: Targets, prediction: Prediction) -> None:
    """Spend HBM left after the veto on precision: upgrade blocks to full precision in order of
    quality and decode time saved per extra byte (in place on ``targets``)."""
    b = snapshot.blocks
    rows = np.arange(b.count)
    hbm = targets.hbm_encoding
    in_hbm = hbm != NONE
    decode_s = scores.static.decode_s
    for tier, group in scores.static.hbm_groups:
        mine = rows[group][in_hbm[group]]
        room = scores.hbm_budget_bytes[tier] - b.nbytes[mine, hbm[mine]].sum()
        candidates = mine[(hbm[mine] != 0) & ~b.leased[mine]]
        if room <= 0 or not len(candidates):
            continue
        current = hbm[candidates]
        extra = b.nbytes[candidates, 0] - b.nbytes[candidates, current]
        p = prediction.use_probability[candidates]
        quality_gain = p * b.sensitivity[candidates, current]
        decode_gain = p * scores.imminence[candidates] * decode_s[candidates, current]
        gain = (quality_gain + decode_gain) / np.maximum(extra, 1)
        taken = take_by_density(gain, np.maximum(extra, 0), room)
        hbm[candidates[taken]] = 0
