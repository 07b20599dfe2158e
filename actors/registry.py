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

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from actors.copies import CopyEntry, CopyStatus, TierInfo
from actors.registry_recipes import RecipeBook
from actors.registry_static import Static, build_static
from policy.builder import DEFAULT_ENCODINGS, h100_pcie5_links
from policy.snapshot import (
    CXL,
    HOST,
    NONE,
    STORAGE,
    LinkModel,
    Snapshot,
    Telemetry,
)
from pool.blocks import BlockSpec
from pool.codecs import encoded_nbytes
from pool.encoding import FULL, Compression, Encoding
from pool.errors import DuplicateBlockError, UnknownBlockError
from pool.regen import LowRankDelta, Tied
from pool.tiers import TierKind

ZSTD_RATIO_ESTIMATE = 0.84  # bench/codecs.py on real INT4 weights; replaced by the measured size


@dataclass
class ModelEntry:
    name: str
    home_hbm: str  # the HBM tier its blocks are placed for (its compute device)
    layers: int
    experts: int


@dataclass
class Registry(RecipeBook):
    """Blocks, tiers and copies. Not thread-safe: the controller holds its lock around calls."""

    encodings: tuple[Encoding, ...] = DEFAULT_ENCODINGS
    links: LinkModel = field(default_factory=h100_pcie5_links)
    tiers: dict[str, TierInfo] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)  # tiers whose actor is gone or unreachable
    draining: set[str] = field(default_factory=set)  # admin goal: nothing new placed there
    specs: dict[str, BlockSpec] = field(default_factory=dict)
    models: dict[str, ModelEntry] = field(default_factory=dict)
    copies: dict[str, dict[tuple[str, Encoding], CopyEntry]] = field(default_factory=dict)
    checksums: dict[tuple[str, Encoding], str] = field(default_factory=dict)
    measured_nbytes: dict[tuple[str, Encoding], int] = field(default_factory=dict)
    recipes: dict[str, Tied | LowRankDelta] = field(default_factory=dict)  # REGENERABLE blocks
    tied_by: dict[str, list[str]] = field(default_factory=dict)  # source -> its tied blocks
    next_epoch: int = 1
    _order: list[str] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict)
    _static: Static | None = None
    _regen_static: Static | None = None  # what _regen_array was made for
    _regen_key: tuple[tuple[int, ...], tuple[tuple[int, int], ...]] = ((), ())
    _regen_array: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    _regen_nbytes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    # Tied blocks' own copies that could share their source's (block, tier, encoding), as of
    # the last snapshot.
    unshared_ties: list[tuple[str, str, Encoding]] = field(default_factory=list)
    sharing: set[str] = field(default_factory=set)  # tiers that share copies (their reports)

    # -- tiers and blocks -----------------------------------------------------------------------

    def add_tier(self, info: TierInfo) -> None:
        """Copy on write: views iterate ``tiers`` without the controller's lock."""
        self.tiers = {**self.tiers, info.tier_id: info}
        self._static = None

    def set_dead(self, tier_id: str, dead: bool) -> bool:
        """Mark a tier dead (its actor is gone) or alive again; True if that changed. Warm
        copies are placed on live tiers only, so the policy's arrays follow."""
        if (tier_id in self.dead) == dead:
            return False
        if dead:
            self.dead.add(tier_id)
        else:
            self.dead.discard(tier_id)
        self._static = None
        return True

    def tiers_of(
        self, kind: TierKind, node_id: str | None = None, live: bool = False
    ) -> list[TierInfo]:
        return [
            t
            for t in self.tiers.values()
            if t.kind is kind
            and (node_id is None or t.node_id == node_id)
            and not (live and (t.tier_id in self.dead or t.tier_id in self.draining))
        ]

    def storage_tier(self) -> TierInfo:
        (storage,) = self.tiers_of(TierKind.STORAGE)
        return storage

    def add_model(
        self,
        name: str,
        specs: Sequence[BlockSpec],
        home_hbm: str,
        recipes: Mapping[str, Tied | LowRankDelta] | None = None,
    ) -> None:
        """Register a model's blocks, placed for the HBM tier ``home_hbm``, those in
        ``recipes`` REGENERABLE by them; all or nothing.

        Raises:
            DuplicateBlockError: a block id (or the model name) is already registered.
            UnknownBlockError: ``home_hbm`` is not an HBM tier.
            SpecError, UnknownBlockError: a recipe does not fit (``check_recipes``).
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
        self.check_recipes(recipes or {}, specs, home_hbm)
        layers = max((s.layer for s in specs if s.layer >= 0), default=-1) + 1
        experts = max((s.expert + 1 for s in specs if s.expert is not None), default=0)
        self.models[name] = ModelEntry(name, home_hbm, max(layers, 1), experts)
        for spec in specs:
            self.specs[spec.block_id] = spec
            self.copies.setdefault(spec.block_id, {})
            self._index[spec.block_id] = len(self._order)
            self._order.append(spec.block_id)
        self.adopt_recipes(recipes or {})
        self._static = None

    def spec(self, block_id: str) -> BlockSpec:
        try:
            return self.specs[block_id]
        except KeyError:
            raise UnknownBlockError(f"no block {block_id!r} in the pool") from None

    def home_of(self, block_id: str) -> TierInfo:
        return self.tiers[self.models[self.spec(block_id).model].home_hbm]

    def warm_tier(self, block_id: str, level: int) -> TierInfo | None:
        """The live HOST or CXL tier a block's warm copy goes to: on its home node, else any."""
        kind = TierKind.HOST if level == HOST else TierKind.CXL
        node = self.home_of(block_id).node_id
        local = self.tiers_of(kind, node, live=True)
        anywhere = self.tiers_of(kind, live=True)
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

    def _current_static(self) -> Static:
        if self._static is None:
            self._static = build_static(self)
        return self._static

    def model_names(self) -> list[str]:
        return list(self.models)

    def positions(self) -> int:
        """Schedule positions of the longest model (the telemetry arrays' width)."""
        return max((m.layers + 2 for m in self.models.values()), default=2)

    def snapshot(
        self,
        telemetry: Telemetry,
        leased: Iterable[str] = (),
        demand: Iterable[str] = (),
        last_use_s: dict[str, float] | None = None,
    ) -> Snapshot:
        """The policy's view of the registry now. ``leased`` and ``demand`` name blocks with a
        live lease and with a waiting acquire."""
        st = self._current_static()
        b = st.blocks
        n = b.count
        enc_index = {enc: j for j, enc in enumerate(self.encodings)}
        tier_index = {t: i for i, t in enumerate(st.tiers.tier_ids)}
        hbm = np.full(n, NONE, np.int64)
        in_flight = np.full(n, NONE, np.int64)
        fallback = np.full(n, STORAGE, np.int64)
        placed = np.full(n, -1e9)
        for i, block_id in enumerate(b.block_ids):
            home = b.hbm_tier[i]
            for c in self.copies[block_id].values():
                t = tier_index.get(c.tier_id, NONE)
                if t == home and c.encoding in enc_index:
                    if c.status is CopyStatus.READY:
                        hbm[i] = enc_index[c.encoding]
                        placed[i] = max(placed[i], c.created_s)
                    elif c.status is CopyStatus.IN_FLIGHT:
                        in_flight[i] = enc_index[c.encoding]
                elif c.status is CopyStatus.READY and c.encoding == FULL:
                    if t == b.host_tier[i]:
                        fallback[i] = HOST
                    elif t == b.cxl_tier[i] and fallback[i] == STORAGE:
                        fallback[i] = CXL
        leased_mask = np.zeros(n, bool)
        leased_mask[[self._index[x] for x in leased if x in self._index]] = True
        demand_mask = np.zeros(n, bool)
        demand_mask[[self._index[x] for x in demand if x in self._index]] = True
        last_use = np.zeros(n)
        for block_id, t_s in (last_use_s or {}).items():
            if block_id in self._index:
                last_use[self._index[block_id]] = t_s
        regenerable, nbytes = self._regen_view(st)
        blocks = dataclasses.replace(
            b,
            nbytes=nbytes,
            regenerable=regenerable,
            leased=leased_mask,
            demand=demand_mask,
            last_use_s=last_use,
            hbm_encoding=hbm,
            fallback_level=fallback,
            in_flight_encoding=in_flight,
            placed_at_s=placed,
        )
        snap = Snapshot(st.encodings, blocks, st.tiers, self.links, st.models, telemetry)
        snap.validate()
        return snap

    # -- reconciliation -------------------------------------------------------------------------

    def reconcile(
        self, tier_id: str, inventory: Iterable[CopyEntry], now_s: float
    ) -> tuple[list[CopyEntry], int]:
        """Make the registry's copies on ``tier_id`` equal to the tier's own inventory, and learn
        the checksums and sizes it reports.

        Copies the registry has but the tier does not are forgotten (copies in flight to it are
        kept: their transfer settles them); copies the tier holds of known blocks are adopted,
        as placed at ``now_s``; copies of blocks the registry does not know are left alone.
        Returns the forgotten copies and the number adopted.
        """
        held = {(c.block_id, c.encoding): c for c in inventory if c.block_id in self.specs}
        forgotten = [
            c
            for c in self.copies_on(tier_id)
            if (c.block_id, c.encoding) not in held and c.status is not CopyStatus.IN_FLIGHT
        ]
        for c in forgotten:
            self.remove_copy(c.block_id, c.tier_id, c.encoding)
        adopted = 0
        for (block_id, encoding), c in held.items():
            if c.checksum:
                self.checksums.setdefault((block_id, encoding), c.checksum)
                self.measured(block_id, encoding, c.nbytes)
            if self.copy(block_id, tier_id, encoding) is None:
                c.created_s = now_s  # adopted copies count as placed now (the dwell restarts)
                self.add_copy(c)
                adopted += 1
        return forgotten, adopted
