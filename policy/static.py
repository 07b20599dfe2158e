"""What the step derives from the parts of a snapshot that describe blocks rather than where they
are (sizes, sensitivities, floors, kinds, tiers), cached across steps.

Contract: the arrays of a snapshot are never modified in place; a change (a new block, a new
calibration) comes as new arrays. The cache is keyed by the identity of those arrays and holds
them, so an identity can never be reused while it is cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import is_

import numpy as np

from policy.snapshot import CXL, EXPERT_CODE, HBM, HOST, NONE, STORAGE, Snapshot

Rows = np.ndarray | slice  # an index array, or slice(None) for "every block"


@dataclass(frozen=True)
class Static:
    keys: tuple[np.ndarray, ...]
    full_bytes: np.ndarray  # [N] float64
    full_nbytes: np.ndarray  # [N] int64, contiguous: the bytes of a full-precision copy
    decode_s: np.ndarray  # [N, E] time to decode each encoding before use: full bytes / rate
    allowed: np.ndarray  # [N, E] encodings the floor allows and whose sensitivity is known
    hbm_groups: tuple[tuple[int, Rows], ...]  # per HBM tier, its blocks
    host_groups: tuple[tuple[int, Rows], ...]
    cxl_groups: tuple[tuple[int, Rows], ...]
    # The tiers of each group, as the kernels take them. PERF: built once, not per step.
    hbm_group_tiers: np.ndarray  # [G] int64
    host_group_tiers: np.ndarray
    cxl_group_tiers: np.ndarray
    expert_rows: np.ndarray
    expert_model: np.ndarray
    expert_layer: np.ndarray
    expert_index: np.ndarray
    expert_flat: np.ndarray  # (model, layer, expert) flattened in the state's [M, L, E] grid
    # Where each run of experts of one (model, layer), consecutive in row and in flat index,
    # starts (indices into the expert_ arrays), then their number. PERF: the predict kernels
    # read per run, not per expert, what does not change along one.
    expert_runs: np.ndarray
    in_tier_of_level: dict[int, np.ndarray]  # per level, the tier indices that exist
    hbm_tiers: tuple[int, ...]  # the HBM tiers' indices (PERF: the plan's metrics, per step)
    warm_tiers: tuple[int, ...]  # the host, then the CXL tiers' indices
    recovery_by_level: np.ndarray  # [4, N] time to recover the block from a copy at each level
    preferred_by_level: np.ndarray  # [4, N] int8: densest allowed HBM encoding, fallback there
    unit_density_by_level: np.ndarray  # [4, N] its value per byte, per unit of p * imminence
    # [4, N] its bytes. PERF: ``choose_hbm`` reads one contiguous row, not the [N, E] table.
    preferred_nbytes_by_level: np.ndarray
    # [E] the fewest bytes an upgrade to full precision from each encoding adds, over every
    # block. PERF: ``refine_precision`` reads no row of a block whose upgrade cannot fit.
    least_upgrade_nbytes: np.ndarray
    floor_fallback: np.ndarray  # [N] the smallest encoding the floor allows
    budget_fallback: np.ndarray  # [N, E] int8: the smallest allowed encoding less sensitive than e
    decode_rate: np.ndarray  # [E] bytes per second of decode (0: read as it is); see decode_s
    per_byte_to_hbm_s: np.ndarray  # [4] seconds per byte from each level to HBM (inf: no link)
    latency_to_hbm_s: np.ndarray  # [4] latency from each level to HBM
    storage_tier: int  # the storage tier's index (NONE: none)


def _runs(rows: np.ndarray, model: np.ndarray, layer: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """The starts of the runs of ``Static.expert_runs``, then the number of experts."""
    starts = np.ones(len(flat), bool)
    starts[1:] = (
        (model[1:] != model[:-1])
        | (layer[1:] != layer[:-1])
        | (np.diff(flat) != 1)
        | (np.diff(rows) != 1)
    )
    return np.append(np.flatnonzero(starts), len(flat)).astype(np.int64)


def preferred_nbytes(nbytes: np.ndarray, preferred_by_level: np.ndarray) -> np.ndarray:
    """[L, N] the bytes of each block's encoding ``preferred_by_level[level, row]``."""
    index = preferred_by_level.T.astype(np.intp)
    return np.ascontiguousarray(np.take_along_axis(nbytes, index, axis=1).T)


def least_upgrade_nbytes(nbytes: np.ndarray) -> np.ndarray:
    """[E] the fewest bytes an upgrade to full precision from each encoding adds to any block
    (at least 0; the int64 maximum for no block)."""
    growth = np.maximum(nbytes[:, :1] - nbytes, 0)
    least: np.ndarray = growth.min(axis=0, initial=np.iinfo(np.int64).max)
    return least


def cheapest(nbytes: np.ndarray, allowed: np.ndarray, sensitivity: np.ndarray) -> np.ndarray:
    """Per row, the allowed encoding with the fewest bytes, the least sensitive among equals
    (full precision is always allowed)."""
    size = np.where(allowed, nbytes, np.iinfo(np.int64).max)
    smallest = size == size.min(axis=1, keepdims=True)
    choice: np.ndarray = np.argmin(np.where(smallest, sensitivity, np.inf), axis=1)
    return choice


def _groups(tier_of: np.ndarray, tiers: np.ndarray) -> tuple[tuple[int, Rows], ...]:
    groups: list[tuple[int, Rows]] = []
    for tier in tiers.tolist():
        rows = np.flatnonzero(tier_of == tier)
        if len(rows) == len(tier_of):
            groups.append((tier, slice(None)))
        elif len(rows):
            groups.append((tier, rows))
    return tuple(groups)


def _group_tiers(groups: tuple[tuple[int, Rows], ...]) -> np.ndarray:
    return np.array([tier for tier, _ in groups], np.int64)


def static_for(snapshot: Snapshot, cached: Static | None, grid: tuple[int, int, int]) -> Static:
    b, enc, tiers = snapshot.blocks, snapshot.encodings, snapshot.tiers
    keys = (
        b.nbytes,
        b.sensitivity,
        b.floor_bits,
        b.hbm_tier,
        b.host_tier,
        b.cxl_tier,
        b.kind,
        b.model,
        b.position,
        b.expert,
        enc.decode_gbps,
        tiers.level,
        b.regenerable,
        snapshot.links.gbps,
        snapshot.links.latency_s,
    )
    # PERF: ``map(is_, ...)`` in C, not a generator's frame a key (timeit: 2.1 -> 1.0 us).
    if cached is not None and len(cached.keys) == len(keys) and all(map(is_, cached.keys, keys)):
        return cached
    full_bytes = b.nbytes[:, 0].astype(np.float64)
    needs_decode = np.isfinite(enc.decode_gbps)  # inf: compute reads the encoding as it is
    decode_s = np.zeros(b.nbytes.shape)
    decode_s[:, needs_decode] = full_bytes[:, None] / (enc.decode_gbps[needs_decode] * 1e9)
    allowed = (enc.bits[None, :] >= b.floor_bits[:, None]) & np.isfinite(b.sensitivity)
    levels = {level: np.flatnonzero(tiers.level == level) for level in (HBM, HOST, CXL)}
    expert_rows = np.flatnonzero(b.kind == EXPERT_CODE)
    _, n_layers, n_experts = grid
    model = b.model[expert_rows].astype(np.int64)
    layer = (b.position[expert_rows] - 1).astype(np.int64)
    expert = b.expert[expert_rows].astype(np.int64)
    flat = (model * n_layers + layer) * n_experts + expert
    # Recovery time from each level, and the densest encoding given it. With p * imminence a
    # common factor of every encoding's value, the densest encoding does not depend on it.
    links = snapshot.links
    gbps = links.gbps[:, HBM]
    with np.errstate(divide="ignore"):
        per_byte = np.where(gbps > 0, 1.0 / (gbps * 1e9), np.inf)
    recovery = links.latency_s[:, HBM][:, None] + per_byte[:, None] * full_bytes[None, :]
    if b.regenerable.any():
        regenerate = full_bytes / (links.regenerate_gbps * 1e9)
        recovery = np.where(b.regenerable[None, :], np.minimum(recovery, regenerate), recovery)
    # PERF: small types for the [4, N] and [N, E] tables the step reads every tick (at a
    # million blocks each pass over an int64 table reads 32 to 40 MB).
    preferred = np.zeros(recovery.shape, np.int8)
    unit = np.zeros(recovery.shape)
    for level in range(recovery.shape[0]):
        if not np.all(np.isfinite(recovery[level])):
            continue  # no link from this level: nothing falls back to it
        per_encoding = (recovery[level][:, None] - decode_s) / b.nbytes
        per_encoding = np.where(allowed, per_encoding, -np.inf)  # floors: never proposed below
        # The densest encoding; among equally dense ones (FP8 and INT8), the least sensitive.
        best = per_encoding.max(axis=1, keepdims=True)
        tied = per_encoding >= best - np.abs(best) * 1e-12
        preferred[level] = np.argmin(np.where(tied, b.sensitivity, np.inf), axis=1)
        unit[level] = per_encoding[np.arange(len(full_bytes)), preferred[level]]
    storage = np.flatnonzero(tiers.level == STORAGE)
    hbm_groups = _groups(b.hbm_tier, levels[HBM])
    host_groups = _groups(b.host_tier, levels[HOST])
    cxl_groups = _groups(b.cxl_tier, levels[CXL])
    budget_fallback = np.zeros(b.nbytes.shape, np.int8)
    for e in range(b.nbytes.shape[1]):
        better = allowed & (b.sensitivity < b.sensitivity[:, e : e + 1])
        budget_fallback[:, e] = cheapest(b.nbytes, better, b.sensitivity)
    return Static(
        keys=keys,
        full_bytes=full_bytes,
        full_nbytes=np.ascontiguousarray(b.nbytes[:, 0]),
        decode_s=decode_s,
        allowed=allowed,
        hbm_groups=hbm_groups,
        host_groups=host_groups,
        cxl_groups=cxl_groups,
        hbm_group_tiers=_group_tiers(hbm_groups),
        host_group_tiers=_group_tiers(host_groups),
        cxl_group_tiers=_group_tiers(cxl_groups),
        expert_rows=expert_rows,
        expert_model=model,
        expert_layer=layer,
        expert_index=expert,
        expert_flat=flat,
        expert_runs=_runs(expert_rows, model, layer, flat),
        in_tier_of_level=levels,
        hbm_tiers=tuple(levels[HBM].tolist()),
        warm_tiers=tuple(levels[HOST].tolist() + levels[CXL].tolist()),
        recovery_by_level=recovery,
        preferred_by_level=preferred,
        unit_density_by_level=unit,
        preferred_nbytes_by_level=preferred_nbytes(b.nbytes, preferred),
        least_upgrade_nbytes=least_upgrade_nbytes(b.nbytes),
        floor_fallback=cheapest(b.nbytes, allowed, b.sensitivity),
        budget_fallback=budget_fallback,
        decode_rate=np.where(needs_decode, enc.decode_gbps * 1e9, 0.0),
        per_byte_to_hbm_s=per_byte,
        latency_to_hbm_s=links.latency_s[:, HBM],  # a strided view, as the kernels take it
        storage_tier=int(storage[0]) if len(storage) else NONE,
    )
