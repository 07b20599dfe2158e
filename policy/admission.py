"""Admission of a tick's copies: capacity first, then each link's byte budget.

Split from ``policy.schedule``, which builds the action table these functions judge.
"""

from __future__ import annotations

import numpy as np

from policy._arrays import distinct
from policy._kernels import stable_argsort
from policy.config import PolicyConfig
from policy.plan import Priority
from policy.snapshot import CXL, HBM, HOST, NONE, Snapshot

# Action kinds, one row of the action table each (see policy.schedule).
FETCH, REGENERATE, TRANSCODE, WARM_COPY, SPILL, EVICT, DROP_WARM = range(7)


def admit(
    snapshot: Snapshot,
    block: np.ndarray,
    kind: np.ndarray,
    dst: np.ndarray,
    encoding: np.ndarray,
    cls: np.ndarray,
    deadline: np.ndarray,
    shrink: np.ndarray,
    required_up: np.ndarray,
    cancelled: np.ndarray,
    held: np.ndarray,
    config: PolicyConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Capacity admission: a copy may be started only if its tier holds it alongside everything
    that exists during the tick (ready copies, copies in flight, the old copy of a block being
    re-encoded), after this tick's drops and cancellations. Most urgent first; the rest wait,
    and at most ``max_transitions_per_step`` copies start. A shrink (a smaller copy of a block
    in HBM) that finds no room, while another copy waits for room in its tier, becomes an
    eviction instead: the block is fetched again, smaller, on a later tick. So does an upgrade
    the veto requires that finds no room: the block must not keep serving below its floor or
    past the quality budget while it waits.

    Returns the mask of copies that fit and the mask of shrinks turned into evictions.
    """
    b, tiers = snapshot.blocks, snapshot.tiers
    usable = tiers.usable_bytes.astype(np.float64)
    occupancy = np.zeros(len(tiers.tier_ids))
    resident = np.flatnonzero(b.hbm_encoding != NONE)
    np.add.at(occupancy, b.hbm_tier[resident], b.nbytes[resident, b.hbm_encoding[resident]])
    flying = np.flatnonzero(b.in_flight_encoding != NONE)
    flying = flying[~np.isin(flying, cancelled)]
    np.add.at(occupancy, b.hbm_tier[flying], b.nbytes[flying, b.in_flight_encoding[flying]])
    for level, tier_of in ((HOST, b.host_tier), (CXL, b.cxl_tier)):
        rows = np.flatnonzero(b.fallback_level == level)
        np.add.at(occupancy, tier_of[rows], b.nbytes[rows, 0])
    # Drops free their bytes now.
    rows = block[kind == EVICT]
    np.add.at(occupancy, b.hbm_tier[rows], -b.nbytes[rows, b.hbm_encoding[rows]])
    rows = block[(kind == DROP_WARM) & ~held]
    where = np.where(b.fallback_level[rows] == HOST, b.host_tier[rows], b.cxl_tier[rows])
    np.add.at(occupancy, where, -b.nbytes[rows, 0])

    fills = np.flatnonzero((kind < EVICT) & ~held)
    rows = block[fills]
    to_hbm = dst[fills] == HBM
    tier = np.where(
        to_hbm, b.hbm_tier[rows], np.where(dst[fills] == HOST, b.host_tier[rows], b.cxl_tier[rows])
    )
    size = np.where(to_hbm, b.nbytes[rows, np.maximum(encoding[fills], 0)], b.nbytes[rows, 0])
    fits = np.zeros(len(block), dtype=bool)
    fits[kind >= EVICT] = True
    spilled = np.zeros(len(block), dtype=bool)
    # PERF: per tier, most urgent first, a prefix of what fits (an item never jumps ahead of a
    # more urgent one waiting for room); vectorized, since every candidate copy is admitted here.
    first = _fit_prefix(tier, size, cls[fills], deadline[fills], occupancy, usable)
    waiting_tiers = np.unique(tier[~first & ~shrink[fills] & (tier != NONE)])
    spill = ~first & shrink[fills] & np.isin(b.hbm_tier[rows], waiting_tiers)
    spill |= ~first & required_up[fills]  # quality first: never serve below what the veto set
    if spill.any():  # shrinks lacking room become evictions; the waiting copies get the bytes
        spilled[fills[spill]] = True
        np.add.at(
            occupancy, b.hbm_tier[rows[spill]], -b.nbytes[rows[spill], b.hbm_encoding[rows[spill]]]
        )
        np.add.at(occupancy, tier[first], size[first])
        again = ~first & ~spill
        second = np.zeros(len(fills), dtype=bool)
        second[again] = _fit_prefix(
            tier[again], size[again], cls[fills][again], deadline[fills][again], occupancy, usable
        )
        first |= second
    # The cap on copies started per tick, most urgent first.
    admitted = fills[first]
    admitted = admitted[np.lexsort((deadline[admitted], cls[admitted]))]
    fits[admitted[: config.max_transitions_per_step]] = True
    return fits, spilled


def _fit_prefix(
    tier: np.ndarray,
    size: np.ndarray,
    cls: np.ndarray,
    deadline: np.ndarray,
    occupancy: np.ndarray,
    usable: np.ndarray,
) -> np.ndarray:
    """Per tier, in class then deadline order, the longest prefix whose sizes fit the room."""
    fits = np.zeros(len(tier), dtype=bool)
    if not len(tier):
        return fits
    order = np.lexsort((deadline, cls, tier))
    sorted_tier = tier[order]
    cum = np.cumsum(size[order].astype(np.float64))
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_tier)) + 1]
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(order)]))
    within = cum - (cum[starts] - size[order][starts])[group]
    valid = sorted_tier != NONE
    room = np.where(
        valid, usable[np.maximum(sorted_tier, 0)] - occupancy[np.maximum(sorted_tier, 0)], -1.0
    )
    fits[order] = valid & (within <= room)
    return fits


def within_link_budgets(
    snapshot: Snapshot,
    src: np.ndarray,
    dst: np.ndarray,
    cls: np.ndarray,
    deadline: np.ndarray,
    nbytes: np.ndarray,
    config: PolicyConfig,
) -> np.ndarray:
    """Mask of the transfers issued this tick under each link's byte budget."""
    links, tel = snapshot.links, snapshot.telemetry
    issued = np.zeros(len(src), dtype=bool)
    if not len(src):
        return issued
    link = src * 4 + dst
    # Class first, then deadline: one sortable key (deadlines are seconds from now, clipped).
    key = cls * 1e12 + np.clip(deadline - tel.now_s, -1e11, 1e11)
    for code in distinct(link).tolist():
        mine = np.flatnonzero(link == code)
        capacity = links.gbps.reshape(-1)[code] * 1e9 * config.tick_s
        busy = tel.link_busy_fraction.reshape(-1)[code]
        if capacity <= 0:
            continue
        # A link takes a few transfers per tick: sort only as many as could fit.
        could_fit = int(min(len(mine), capacity // max(int(nbytes[mine].min()), 1) + 2))
        if could_fit < len(mine):
            # PERF: only the ``could_fit`` first in (key, position) order matter: keep every
            # key up to the ``could_fit``-th smallest (ties included), then sort only those.
            mine_key = key[mine]
            kth = np.partition(mine_key, could_fit - 1)[could_fit - 1]
            if not np.isnan(kth):  # a NaN key sorts last: then every key is kept
                mine = mine[mine_key <= kth]
        mine = mine[stable_argsort(key[mine])][:could_fit]
        size = nbytes[mine].astype(np.float64)
        before = np.cumsum(size) - size
        used = busy + before / capacity
        used_after = busy + (before + size) / capacity
        limit = np.where(cls[mine] == Priority.DEMOTION, config.demotion_link_busy_fraction, 1.0)
        first_on_idle_link = (before == 0) & (busy < limit)
        issued[mine] = ((used < limit) & (used_after <= limit)) | first_on_idle_link
    return issued
