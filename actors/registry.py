"""The placement controller's registry: blocks, tiers and every copy, and snapshots built from them.

Pure Python and numpy (no Ray), so that it is tested without a cluster. The registry is the
controller's view of the world; the tier actors' inventories are the facts it is reconciled
against (:meth:`Registry.reconcile`).

Contract:
- a copy is ``IN_FLIGHT`` while a transfer writes it, ``READY`` once its bytes are verified, and
  ``EVICTING`` once the executor decided to drop it (no new lease is granted on it);
- a copy's ``epoch`` is unique across the pool's life (a counter the controller persists through
  the tier inventories: it restarts above the largest epoch it finds), which is what fences leases.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from policy.builder import DEFAULT_DECODE_GBPS, DEFAULT_ENCODINGS, h100_pcie5_links
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
from pool.blocks import BlockSpec
from pool.codecs import encoded_nbytes
from pool.encoding import FULL, PRECISION_BITS, Compression, Encoding, Precision
from pool.errors import DuplicateBlockError, UnknownBlockError
from pool.tiers import TierKind, TierSpec

LEVEL_OF_KIND = {
    TierKind.HBM: HBM,
    TierKind.HOST: HOST,
    TierKind.CXL: CXL,
    TierKind.STORAGE: STORAGE,
}
ZSTD_RATIO_ESTIMATE = 0.84  # bench/codecs.py on real INT4 weights; replaced by the measured size


class CopyStatus(enum.Enum):
    IN_FLIGHT = "in-flight"
    READY = "ready"
    EVICTING = "evicting"


@dataclass(frozen=True)
class TierInfo:
    spec: TierSpec
    node_id: str  # the Ray node the tier's actor is pinned to

    @property
    def tier_id(self) -> str:
        return self.spec.tier_id

    @property
    def kind(self) -> TierKind:
        return self.spec.kind


@dataclass
class CopyEntry:
    block_id: str
    tier_id: str
    encoding: Encoding
    status: CopyStatus
    epoch: int
    nbytes: int = 0
    checksum: str = ""
    created_s: float = 0.0


@dataclass
class ModelEntry:
    name: str
    home_hbm: str  # the HBM tier its blocks are placed for (its compute device)
    layers: int
    experts: int


@dataclass
class _Static:
    """Per-block arrays that change only when blocks are added (kept for the policy's cache)."""

    block_ids: tuple[str, ...]
    model: np.ndarray
    position: np.ndarray
    kind: np.ndarray
    expert: np.ndarray
    nbytes: np.ndarray
    sensitivity: np.ndarray
    floor_bits: np.ndarray
    regenerable: np.ndarray
    hbm_tier: np.ndarray
    host_tier: np.ndarray
    cxl_tier: np.ndarray
    tiers: TierArrays
    models: ModelShapes


@dataclass
class Registry:
    """Blocks, tiers and copies. Not thread-safe: the controller holds its lock around calls."""

    encodings: tuple[Encoding, ...] = DEFAULT_ENCODINGS
    links: LinkModel = field(default_factory=h100_pcie5_links)
    tiers: dict[str, TierInfo] = field(default_factory=dict)
    specs: dict[str, BlockSpec] = field(default_factory=dict)
    models: dict[str, ModelEntry] = field(default_factory=dict)
    copies: dict[str, dict[tuple[str, Encoding], CopyEntry]] = field(default_factory=dict)
    checksums: dict[tuple[str, Encoding], str] = field(default_factory=dict)
    measured_nbytes: dict[tuple[str, Encoding], int] = field(default_factory=dict)
    next_epoch: int = 1
    _order: list[str] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict)
    _static: _Static | None = None

    # -- tiers and blocks -----------------------------------------------------------------------

    def add_tier(self, info: TierInfo) -> None:
        self.tiers[info.tier_id] = info
        self._static = None

    def tiers_of(self, kind: TierKind, node_id: str | None = None) -> list[TierInfo]:
        return [
            t
            for t in self.tiers.values()
            if t.kind is kind and (node_id is None or t.node_id == node_id)
        ]

    def storage_tier(self) -> TierInfo:
        (storage,) = self.tiers_of(TierKind.STORAGE)
        return storage

    def add_model(self, name: str, specs: Sequence[BlockSpec], home_hbm: str) -> None:
        """Register a model's blocks, placed for the HBM tier ``home_hbm``.

        Raises:
            DuplicateBlockError: a block id (or the model name) is already registered.
            UnknownBlockError: ``home_hbm`` is not an HBM tier.
        """
        if home_hbm not in self.tiers or self.tiers[home_hbm].kind is not TierKind.HBM:
            raise UnknownBlockError(
                f"home tier {home_hbm!r} is not an HBM tier of this pool; HBM tiers: "
                f"{[t.tier_id for t in self.tiers_of(TierKind.HBM)]}"
            )
        if name in self.models:
            raise DuplicateBlockError(f"model {name!r} is already registered")
        dup = [s.block_id for s in specs if s.block_id in self.specs]
        if dup:
            raise DuplicateBlockError(f"blocks already registered: {dup[:5]}")
        layers = max((s.layer for s in specs if s.layer >= 0), default=-1) + 1
        experts = max((s.expert + 1 for s in specs if s.expert is not None), default=0)
        self.models[name] = ModelEntry(name, home_hbm, max(layers, 1), experts)
        for spec in specs:
            self.specs[spec.block_id] = spec
            self.copies.setdefault(spec.block_id, {})
            self._index[spec.block_id] = len(self._order)
            self._order.append(spec.block_id)
        self._static = None

    def spec(self, block_id: str) -> BlockSpec:
        try:
            return self.specs[block_id]
        except KeyError:
            raise UnknownBlockError(f"no block {block_id!r} in the pool") from None

    def home_of(self, block_id: str) -> TierInfo:
        return self.tiers[self.models[self.spec(block_id).model].home_hbm]

    def warm_tier(self, block_id: str, level: int) -> TierInfo | None:
        """The HOST or CXL tier a block's warm copy goes to: on its home node, else any."""
        kind = TierKind.HOST if level == HOST else TierKind.CXL
        node = self.home_of(block_id).node_id
        local = self.tiers_of(kind, node)
        anywhere = self.tiers_of(kind)
        chosen = local or anywhere
        return chosen[0] if chosen else None

    # -- copies ---------------------------------------------------------------------------------

    def new_epoch(self) -> int:
        epoch = self.next_epoch
        self.next_epoch += 1
        return epoch

    def add_copy(self, entry: CopyEntry) -> None:
        self.copies[entry.block_id][(entry.tier_id, entry.encoding)] = entry
        self.next_epoch = max(self.next_epoch, entry.epoch + 1)

    def copy(self, block_id: str, tier_id: str, encoding: Encoding) -> CopyEntry | None:
        return self.copies.get(block_id, {}).get((tier_id, encoding))

    def remove_copy(self, block_id: str, tier_id: str, encoding: Encoding) -> CopyEntry | None:
        return self.copies.get(block_id, {}).pop((tier_id, encoding), None)

    def copies_of(self, block_id: str) -> list[CopyEntry]:
        return list(self.copies.get(block_id, {}).values())

    def copies_on(self, tier_id: str) -> list[CopyEntry]:
        return [c for per in self.copies.values() for c in per.values() if c.tier_id == tier_id]

    def drop_tier_copies(self, tier_id: str) -> list[CopyEntry]:
        """Forget every copy on ``tier_id`` (its actor died); return them."""
        gone = self.copies_on(tier_id)
        for c in gone:
            del self.copies[c.block_id][(c.tier_id, c.encoding)]
        return gone

    def ready(self, block_id: str, tier_id: str) -> list[CopyEntry]:
        return [
            c
            for c in self.copies_of(block_id)
            if c.tier_id == tier_id and c.status is CopyStatus.READY
        ]

    def blocks_in_hbm(self) -> set[str]:
        return {
            c.block_id
            for per in self.copies.values()
            for c in per.values()
            if self.tiers[c.tier_id].kind is TierKind.HBM and c.status is CopyStatus.READY
        }

    def measured(self, block_id: str, encoding: Encoding, nbytes: int) -> None:
        """Record a copy's actual size; the policy's arrays are rebuilt if it differs from
        what they assumed (compressed sizes are estimates until measured)."""
        if self.nbytes(block_id, encoding) != nbytes:
            self._static = None
        self.measured_nbytes[(block_id, encoding)] = nbytes

    def nbytes(self, block_id: str, encoding: Encoding) -> int:
        measured = self.measured_nbytes.get((block_id, encoding))
        if measured is not None:
            return measured
        size = encoded_nbytes(self.spec(block_id), encoding.precision)
        return (
            math.ceil(size * ZSTD_RATIO_ESTIMATE)
            if encoding.compression is not Compression.NONE
            else size
        )

    # -- snapshots ------------------------------------------------------------------------------

    def _build_static(self) -> _Static:
        ids = tuple(self._order)
        n, e = len(ids), len(self.encodings)
        tier_list = list(self.tiers.values())
        tier_index = {t.tier_id: i for i, t in enumerate(tier_list)}
        model_names = list(self.models)
        model_index = {m: i for i, m in enumerate(model_names)}
        nbytes = np.zeros((n, e), np.int64)
        sensitivity = np.zeros((n, e))
        arrays: dict[str, list[int]] = {k: [] for k in ("model", "position", "kind", "expert")}
        floor, hbm_tier, host_tier, cxl_tier = [], [], [], []
        for i, block_id in enumerate(ids):
            spec = self.specs[block_id]
            model = self.models[spec.model]
            arrays["model"].append(model_index[spec.model])
            arrays["position"].append(min(spec.layer + 1, model.layers + 1))
            arrays["kind"].append(KIND_CODES[spec.kind])
            arrays["expert"].append(NONE if spec.expert is None else spec.expert)
            floor.append(PRECISION_BITS[spec.floor])
            hbm_tier.append(tier_index[model.home_hbm])
            host = self.warm_tier(block_id, HOST)
            cxl = self.warm_tier(block_id, CXL)
            host_tier.append(NONE if host is None else tier_index[host.tier_id])
            cxl_tier.append(NONE if cxl is None else tier_index[cxl.tier_id])
            for j, enc in enumerate(self.encodings):
                nbytes[i, j] = self.nbytes(block_id, enc)
                if enc.precision is Precision.FULL:
                    continue
                known = spec.sensitivity.get(enc.precision)
                sensitivity[i, j] = np.inf if known is None else known
        tiers = TierArrays(
            tuple(t.tier_id for t in tier_list),
            np.array([LEVEL_OF_KIND[t.kind] for t in tier_list], np.int8),
            np.array([t.spec.capacity_bytes or (1 << 62) for t in tier_list], np.int64),
            np.zeros(len(tier_list), np.int64),
        )
        entries = [self.models[m] for m in model_names]
        models = ModelShapes(
            positions=np.array([m.layers + 2 for m in entries], np.int32),
            layers=np.array([m.layers for m in entries], np.int32),
            experts=np.array([m.experts for m in entries], np.int32),
        )
        return _Static(
            block_ids=ids,
            model=np.array(arrays["model"], np.int32),
            position=np.array(arrays["position"], np.int32),
            kind=np.array(arrays["kind"], np.int8),
            expert=np.array(arrays["expert"], np.int32),
            nbytes=nbytes,
            sensitivity=sensitivity,
            floor_bits=np.array(floor, np.int16),
            regenerable=np.zeros(n, bool),
            hbm_tier=np.array(hbm_tier, np.int64),
            host_tier=np.array(host_tier, np.int64),
            cxl_tier=np.array(cxl_tier, np.int64),
            tiers=tiers,
            models=models,
        )

    def model_names(self) -> list[str]:
        return list(self.models)

    def index(self, block_id: str) -> int:
        return self._index[block_id]

    def snapshot(
        self,
        telemetry: Telemetry,
        leased: Iterable[str] = (),
        demand: Iterable[str] = (),
        last_use_s: dict[str, float] | None = None,
    ) -> Snapshot:
        """The policy's view of the registry now. ``leased`` and ``demand`` name blocks with a
        live lease and with a waiting acquire."""
        if self._static is None:
            self._static = self._build_static()
        st = self._static
        n = len(st.block_ids)
        enc_index = {enc: j for j, enc in enumerate(self.encodings)}
        tier_index = {t: i for i, t in enumerate(st.tiers.tier_ids)}
        hbm = np.full(n, NONE, np.int64)
        in_flight = np.full(n, NONE, np.int64)
        fallback = np.full(n, STORAGE, np.int64)
        placed = np.full(n, -1e9)
        for i, block_id in enumerate(st.block_ids):
            home = st.hbm_tier[i]
            for c in self.copies[block_id].values():
                t = tier_index.get(c.tier_id, NONE)
                if t == home and c.encoding in enc_index:
                    if c.status is CopyStatus.READY:
                        hbm[i] = enc_index[c.encoding]
                        placed[i] = max(placed[i], c.created_s)
                    elif c.status is CopyStatus.IN_FLIGHT:
                        in_flight[i] = enc_index[c.encoding]
                elif c.status is CopyStatus.READY and c.encoding == FULL:
                    if t == st.host_tier[i]:
                        fallback[i] = HOST
                    elif t == st.cxl_tier[i] and fallback[i] == STORAGE:
                        fallback[i] = CXL
        leased_mask = np.zeros(n, bool)
        leased_mask[[self._index[b] for b in leased if b in self._index]] = True
        demand_mask = np.zeros(n, bool)
        demand_mask[[self._index[b] for b in demand if b in self._index]] = True
        last_use = np.zeros(n)
        for block_id, t_s in (last_use_s or {}).items():
            if block_id in self._index:
                last_use[self._index[block_id]] = t_s
        blocks = BlockArrays(
            block_ids=st.block_ids,
            model=st.model,
            position=st.position,
            kind=st.kind,
            expert=st.expert,
            nbytes=st.nbytes,
            sensitivity=st.sensitivity,
            floor_bits=st.floor_bits,
            leased=leased_mask,
            demand=demand_mask,
            last_use_s=last_use,
            hbm_encoding=hbm,
            fallback_level=fallback,
            in_flight_encoding=in_flight,
            placed_at_s=placed,
            regenerable=st.regenerable,
            hbm_tier=st.hbm_tier,
            host_tier=st.host_tier,
            cxl_tier=st.cxl_tier,
        )
        decode = np.array(
            [
                DEFAULT_DECODE_GBPS[DEFAULT_ENCODINGS.index(e)]
                if e in DEFAULT_ENCODINGS
                else (np.inf if e.directly_usable else 4.0)
                for e in self.encodings
            ]
        )
        snap = Snapshot(
            EncodingTable(self.encodings, decode),
            blocks,
            st.tiers,
            self.links,
            st.models,
            telemetry,
        )
        snap.validate()
        return snap

    def idle_telemetry(self, now_s: float) -> Telemetry:
        if self._static is None:
            self._static = self._build_static()
        m = len(self.models)
        positions = int(self._static.models.positions.max()) if m else 2
        return Telemetry(
            now_s=now_s,
            layer_time_s=np.full((m, positions), np.nan),
            current_position=np.full(m, NONE, np.int32),
            concurrency=np.zeros(m, np.int32),
        )

    # -- reconciliation -------------------------------------------------------------------------

    def reconcile(
        self, tier_id: str, inventory: Iterable[CopyEntry], now_s: float = 0.0
    ) -> tuple[int, int]:
        """Make the registry's copies on ``tier_id`` equal to the tier's own inventory.

        Copies the registry has but the tier does not are forgotten; copies the tier holds of
        known blocks are adopted (unknown blocks are ignored: the caller drops them). Returns
        (forgotten, adopted).
        """
        held = {(c.block_id, c.encoding): c for c in inventory if c.block_id in self.specs}
        forgotten = 0
        for c in self.copies_on(tier_id):
            if (c.block_id, c.encoding) not in held and c.status is not CopyStatus.IN_FLIGHT:
                self.remove_copy(c.block_id, c.tier_id, c.encoding)
                forgotten += 1
        adopted = 0
        for (block_id, encoding), c in held.items():
            if self.copy(block_id, tier_id, encoding) is None:
                c.created_s = now_s  # adopted copies count as placed now (the dwell restarts)
                self.add_copy(c)
                adopted += 1
        return forgotten, adopted
