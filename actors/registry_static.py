"""The registry's static arrays: what changes only when blocks or tiers are added (the policy
caches its derivations by the identity of these arrays). Split from :mod:`actors.registry`; pure
Python and numpy, no Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from policy.builder import DEFAULT_DECODE_GBPS, DEFAULT_ENCODINGS
from policy.snapshot import (
    CXL,
    HBM,
    HOST,
    KIND_CODES,
    NONE,
    STORAGE,
    BlockArrays,
    EncodingTable,
    ModelShapes,
    TierArrays,
)
from pool.encoding import PRECISION_BITS, Precision
from pool.tiers import TierKind

if TYPE_CHECKING:
    from actors.registry import Registry

LEVEL_OF_KIND = {
    TierKind.HBM: HBM,
    TierKind.HOST: HOST,
    TierKind.CXL: CXL,
    TierKind.STORAGE: STORAGE,
}


@dataclass(frozen=True)
class Static:
    """What changes only when blocks or tiers are added, kept across steps (the policy caches
    its derivations by the identity of these arrays). ``blocks`` holds the per-block arrays that
    describe blocks; its residency arrays are placeholders each snapshot replaces."""

    blocks: BlockArrays
    encodings: EncodingTable
    tiers: TierArrays
    models: ModelShapes


def build_static(reg: Registry) -> Static:
    """The registry's blocks, encodings, tiers and models as the policy's static arrays."""
    ids = tuple(reg._order)
    n, e = len(ids), len(reg.encodings)
    tier_list = list(reg.tiers.values())
    tier_index = {t.tier_id: i for i, t in enumerate(tier_list)}
    model_index = {m: i for i, m in enumerate(reg.models)}
    nbytes = np.zeros((n, e), np.int64)
    sensitivity = np.zeros((n, e))
    rows: list[tuple[int, ...]] = []
    for i, block_id in enumerate(ids):
        spec = reg.specs[block_id]
        model = reg.models[spec.model]
        host = reg.warm_tier(block_id, HOST)
        cxl = reg.warm_tier(block_id, CXL)
        rows.append(
            (
                model_index[spec.model],
                min(spec.layer + 1, model.layers + 1),
                KIND_CODES[spec.kind],
                NONE if spec.expert is None else spec.expert,
                PRECISION_BITS[spec.floor],
                tier_index[model.home_hbm],
                NONE if host is None else tier_index[host.tier_id],
                NONE if cxl is None else tier_index[cxl.tier_id],
            )
        )
        for j, enc in enumerate(reg.encodings):
            nbytes[i, j] = reg.nbytes(block_id, enc)
            if enc.precision is not Precision.FULL:
                known = spec.sensitivity.get(enc.precision)
                sensitivity[i, j] = np.inf if known is None else known
    columns = np.array(rows, np.int64).reshape(n, 8).T
    none = np.full(n, NONE, np.int64)
    blocks = BlockArrays(
        block_ids=ids,
        model=columns[0].astype(np.int32),
        position=columns[1].astype(np.int32),
        kind=columns[2].astype(np.int8),
        expert=columns[3].astype(np.int32),
        nbytes=nbytes,
        sensitivity=sensitivity,
        floor_bits=columns[4].astype(np.int16),
        leased=np.zeros(n, bool),
        demand=np.zeros(n, bool),
        last_use_s=np.zeros(n),
        hbm_encoding=none,
        fallback_level=none,
        in_flight_encoding=none,
        placed_at_s=np.zeros(n),
        regenerable=np.zeros(n, bool),  # which can be rebuilt now: see ``_regen_view``
        hbm_tier=columns[5].copy(),
        host_tier=columns[6].copy(),
        cxl_tier=columns[7].copy(),
    )
    decode = np.array(
        [
            DEFAULT_DECODE_GBPS[DEFAULT_ENCODINGS.index(e)]
            if e in DEFAULT_ENCODINGS
            else (np.inf if e.directly_usable else 4.0)
            for e in reg.encodings
        ]
    )
    tiers = TierArrays(
        tuple(t.tier_id for t in tier_list),
        np.array([LEVEL_OF_KIND[t.kind] for t in tier_list], np.int8),
        np.array([t.spec.capacity_bytes or (1 << 62) for t in tier_list], np.int64),
        np.zeros(len(tier_list), np.int64),
    )
    entries = list(reg.models.values())
    models = ModelShapes(
        positions=np.array([m.layers + 2 for m in entries], np.int32),
        layers=np.array([m.layers for m in entries], np.int32),
        experts=np.array([m.experts for m in entries], np.int32),
    )
    return Static(blocks, EncodingTable(reg.encodings, decode), tiers, models)
