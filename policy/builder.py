"""Build snapshots: from per-block rows (tests), or synthetic MoE pools (benchmarks, replay).

The placement actor builds its snapshot from the registry; these builders produce the same arrays
from a compact description, with a hardware model of an H100 on PCIe 5 by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from policy.plan import Plan
from policy.snapshot import (
    CXL,
    HBM,
    HOST,
    KIND_CODES,
    NONE,
    STORAGE,
    BlockArrays,
    EncodingTable,
    LinkModel,
    ModelShapes,
    Snapshot,
    Telemetry,
    TierArrays,
)
from pool.blocks import BlockKind
from pool.encoding import PRECISION_BITS, Encoding, Precision

DEFAULT_ENCODINGS = tuple(Encoding.parse(e) for e in ("full", "fp8", "int8", "int4", "int4+zstd"))
# Bytes per encoding relative to a bfloat16 checkpoint: one float32 scale per row of 4096 (8-bit)
# or per group of 128 (INT4); INT4+zstd as measured on real INT4 weights (bench/codecs.py: 0.84
# of INT4).
DEFAULT_SIZE_RATIOS = np.array(
    [1.0, 0.5 + 2 / 4096, 0.5 + 2 / 4096, 0.25 + 2 / 128, 0.84 * (0.25 + 2 / 128)]
)
DEFAULT_DECODE_GBPS = np.array([np.inf, np.inf, np.inf, np.inf, 4.0])


def encoding_sizes(full_bytes: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """``[N, E]`` bytes per encoding from full-precision bytes and per-encoding size ratios."""
    sizes: np.ndarray = np.maximum(np.rint(full_bytes[:, None] * ratios[None, :]), 1).astype(
        np.int64
    )
    return sizes


def h100_pcie5_links() -> LinkModel:
    """Per level pair (source, destination): H100 on PCIe 5 (about 50 GB/s practical host link),
    CXL about 30 GB/s, NVMe about 12 GB/s; HBM->HBM is local transcoding."""
    gbps = np.zeros((4, 4))
    latency = np.zeros((4, 4))
    gbps[HOST, HBM] = gbps[HBM, HOST] = 50.0
    gbps[CXL, HBM] = gbps[HBM, CXL] = 30.0
    gbps[STORAGE, HBM] = 12.0
    gbps[STORAGE, HOST] = gbps[STORAGE, CXL] = 12.0
    gbps[HOST, CXL] = gbps[CXL, HOST] = 30.0
    gbps[HBM, HBM] = 1000.0
    latency[HOST, HBM] = latency[CXL, HBM] = 10e-6
    latency[STORAGE, HBM] = latency[STORAGE, HOST] = latency[STORAGE, CXL] = 100e-6
    return LinkModel(gbps, latency)


@dataclass
class BlockRow:
    """One block of a hand-made snapshot; defaults make a cold dense block of layer 0."""

    block_id: str
    full_bytes: int = 1 << 20
    layer: int = 0
    kind: BlockKind = BlockKind.DENSE
    expert: int = NONE
    model: int = 0
    sensitivity: Sequence[float] | None = None  # per encoding; default: none (0)
    floor: Precision = Precision.INT4
    leased: bool = False
    demand: bool = False
    hbm_encoding: int = NONE
    fallback_level: int = STORAGE
    in_flight_encoding: int = NONE
    placed_at_s: float = -1e9
    regenerable: bool = False
    device: int = 0


@dataclass
class PoolShape:
    """Tiers and models of a hand-made snapshot."""

    hbm_bytes: Sequence[int] = (1 << 30,)
    host_bytes: int = 1 << 34
    cxl_bytes: int = 0
    layers: Sequence[int] = (4,)
    experts: Sequence[int] = (0,)
    encodings: tuple[Encoding, ...] = DEFAULT_ENCODINGS
    size_ratios: np.ndarray = field(default_factory=DEFAULT_SIZE_RATIOS.copy)
    decode_gbps: np.ndarray = field(default_factory=DEFAULT_DECODE_GBPS.copy)
    links: LinkModel = field(default_factory=h100_pcie5_links)


def tiers_for(shape: PoolShape) -> tuple[TierArrays, int, int]:
    """Tier arrays: the HBM tiers (one per device), then host, CXL if any, storage.
    Returns the arrays and the host and CXL tier indices (CXL ``NONE`` when absent)."""
    ids = [f"hbm{d}" for d in range(len(shape.hbm_bytes))]
    levels = [HBM] * len(shape.hbm_bytes)
    capacity = list(shape.hbm_bytes)
    host = len(ids)
    ids.append("host")
    levels.append(HOST)
    capacity.append(shape.host_bytes)
    cxl = NONE
    if shape.cxl_bytes:
        cxl = len(ids)
        ids.append("cxl")
        levels.append(CXL)
        capacity.append(shape.cxl_bytes)
    ids.append("storage")
    levels.append(STORAGE)
    capacity.append(1 << 62)
    arrays = TierArrays(
        tuple(ids),
        np.array(levels, np.int8),
        np.array(capacity, np.int64),
        np.zeros(len(ids), np.int64),
    )
    return arrays, host, cxl


def idle_telemetry(shape: PoolShape, now_s: float = 0.0) -> Telemetry:
    m = len(shape.layers)
    positions = max(shape.layers) + 2
    return Telemetry(
        now_s=now_s,
        layer_time_s=np.full((m, positions), np.nan),
        current_position=np.full(m, NONE, np.int32),
        concurrency=np.zeros(m, np.int32),
    )


def build_snapshot(rows: Sequence[BlockRow], shape: PoolShape, telemetry: Telemetry) -> Snapshot:
    tiers, host, cxl = tiers_for(shape)
    e = len(shape.encodings)
    full = np.array([r.full_bytes for r in rows], np.int64)
    nbytes = encoding_sizes(full, shape.size_ratios[:e])
    sensitivity = np.zeros((len(rows), e))
    for i, row in enumerate(rows):
        if row.sensitivity is not None:
            sensitivity[i] = row.sensitivity
    blocks = BlockArrays(
        block_ids=tuple(r.block_id for r in rows),
        model=np.array([r.model for r in rows], np.int32),
        position=np.array([r.layer + 1 for r in rows], np.int32),
        kind=np.array([KIND_CODES[r.kind] for r in rows], np.int8),
        expert=np.array([r.expert for r in rows], np.int32),
        nbytes=nbytes,
        sensitivity=sensitivity,
        floor_bits=np.array([PRECISION_BITS[r.floor] for r in rows], np.int16),
        leased=np.array([r.leased for r in rows], bool),
        demand=np.array([r.demand for r in rows], bool),
        last_use_s=np.zeros(len(rows)),
        hbm_encoding=np.array([r.hbm_encoding for r in rows], np.int64),
        fallback_level=np.array([r.fallback_level for r in rows], np.int64),
        in_flight_encoding=np.array([r.in_flight_encoding for r in rows], np.int64),
        placed_at_s=np.array([r.placed_at_s for r in rows], np.float64),
        regenerable=np.array([r.regenerable for r in rows], bool),
        hbm_tier=np.array([r.device for r in rows], np.int64),
        host_tier=np.full(len(rows), host, np.int64),
        cxl_tier=np.full(len(rows), cxl, np.int64),
    )
    models = ModelShapes(
        positions=np.array(shape.layers, np.int32) + 2,
        layers=np.array(shape.layers, np.int32),
        experts=np.array(shape.experts, np.int32),
    )
    snapshot = Snapshot(
        EncodingTable(shape.encodings, shape.decode_gbps[:e]),
        blocks,
        tiers,
        shape.links,
        models,
        telemetry,
    )
    snapshot.validate()
    return snapshot


def execute_instantly(snapshot: Snapshot, plan: Plan, now_s: float) -> Snapshot:
    """A fake executor for tests and benchmarks: every transition in ``plan`` completes at once
    (the block lands at its target encoding and fallback level), cancelled copies vanish, and
    copies that were already in flight land."""
    b = snapshot.blocks
    hbm = b.hbm_encoding.copy()
    fallback = b.fallback_level.copy()
    in_flight = b.in_flight_encoding.copy()
    placed = b.placed_at_s.copy()
    in_flight[plan.cancel_block] = NONE
    rows = plan.transition_rows.block
    hbm[rows] = plan.transition_rows.target_encoding
    fallback[rows] = plan.transition_rows.fallback_level
    landed = rows[b.hbm_encoding[rows] != hbm[rows]]
    in_flight[landed] = NONE  # replaced by what this plan put there
    placed[landed] = now_s
    arriving = np.flatnonzero(in_flight != NONE)  # copies already on their way land too
    hbm[arriving] = in_flight[arriving]
    in_flight[arriving] = NONE
    placed[arriving] = now_s
    blocks = replace(
        b,
        hbm_encoding=hbm,
        fallback_level=fallback,
        in_flight_encoding=in_flight,
        placed_at_s=placed,
        demand=np.zeros_like(b.demand),
    )
    return replace(snapshot, blocks=blocks)
