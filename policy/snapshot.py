"""The snapshot: everything the control step knows, as arrays (struct of arrays over blocks).

The step reads a snapshot and never changes it. Blocks are rows; the encoding axis ``E`` follows
``Snapshot.encodings`` (index 0 is always full precision). Residency is by *level*, the tier kinds
as a block's compute device sees them: its own HBM, its node's host memory, its node's CXL memory,
or storage. A block's copies are summarised as: the encoding of its ready HBM copy (or none), the
fastest level holding a ready copy outside HBM (its fallback), and the encoding of a copy in
flight toward HBM (or none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from pool.blocks import BlockKind
from pool.encoding import PRECISION_BITS, Encoding, Precision
from pool.tiers import TierKind

# Level codes (array values). Compared by equality only, never by order.
HBM, HOST, CXL, STORAGE = 0, 1, 2, 3
LEVEL_KINDS: dict[int, TierKind] = {
    HBM: TierKind.HBM,
    HOST: TierKind.HOST,
    CXL: TierKind.CXL,
    STORAGE: TierKind.STORAGE,
}
NONE = -1  # "no copy" / "no tier" / "not an expert"

KIND_CODES: dict[BlockKind, int] = {kind: i for i, kind in enumerate(BlockKind)}
EXPERT_CODE = KIND_CODES[BlockKind.EXPERT]


@dataclass(frozen=True)
class EncodingTable:
    """The encodings a pool uses, and what the policy needs to know of each.

    Attributes:
        encodings: index 0 must be full precision, uncompressed.
        decode_gbps: decode throughput (GB/s of full-precision output) per encoding at the
            destination; ``inf`` for encodings compute reads as they are.
    """

    encodings: tuple[Encoding, ...]
    decode_gbps: np.ndarray

    def __post_init__(self) -> None:
        if not self.encodings or self.encodings[0] != Encoding():
            raise ValueError(
                f"encodings[0] is {self.encodings[:1]}; expected full precision, uncompressed"
            )
        if self.decode_gbps.shape != (len(self.encodings),):
            raise ValueError(
                f"decode_gbps has shape {self.decode_gbps.shape}; expected ({len(self.encodings)},)"
            )
        if not bool(np.all(self.decode_gbps > 0)):
            raise ValueError(f"decode_gbps {self.decode_gbps.tolist()} must all be > 0")

    @cached_property
    def bits(self) -> np.ndarray:
        return np.array([PRECISION_BITS[e.precision] for e in self.encodings], dtype=np.int16)

    @cached_property
    def usable(self) -> np.ndarray:
        return np.array([e.directly_usable for e in self.encodings], dtype=bool)

    @cached_property
    def precision_index(self) -> np.ndarray:
        """Per encoding, the index of its precision in ``Precision``'s order (int64)."""
        order = list(Precision)
        return np.array([order.index(e.precision) for e in self.encodings], np.int64)

    @cached_property
    def full_precision(self) -> np.ndarray:
        return np.array([e.precision is Precision.FULL for e in self.encodings], dtype=bool)


@dataclass(frozen=True)
class BlockArrays:
    """One row per block. ``N`` blocks, ``E`` encodings.

    Attributes:
        block_ids: ids, used only to name blocks in plans.
        model: model index (rows of the telemetry arrays).
        position: position in the model's layer schedule: ``layer + 1`` (embeddings at 0, the
            last layer's successors at ``layers + 1``).
        kind: ``KIND_CODES`` of the block's kind.
        expert: expert index, or ``NONE``.
        nbytes: bytes of a copy at each encoding, ``[N, E]``.
        sensitivity: predicted drift at each encoding, ``[N, E]``; 0 at full precision;
            ``inf`` where unknown (never chosen by the veto).
        floor_bits: the precision floor, in ``PRECISION_BITS``.
        leased: a lease currently pins the block's copies.
        demand: an acquire is waiting on the block (a lease miss).
        last_use_s: when the block was last used.
        hbm_encoding: encoding index of the ready HBM copy, or ``NONE``.
        fallback_level: the fastest level other than HBM that holds a ready full-precision copy
            (``HOST``, ``CXL`` or ``STORAGE``; storage always does).
        in_flight_encoding: encoding index of a copy in flight toward HBM, or ``NONE``.
        placed_at_s: when the block's placement last changed.
        regenerable: a regenerator can rebuild the block (tied weights, base plus delta).
        hbm_tier, host_tier, cxl_tier: indices into the tier arrays of the block's compute
            device's HBM and its node's host and CXL memory (``NONE`` where there is none).
    """

    block_ids: tuple[str, ...]
    model: np.ndarray
    position: np.ndarray
    kind: np.ndarray
    expert: np.ndarray
    nbytes: np.ndarray
    sensitivity: np.ndarray
    floor_bits: np.ndarray
    leased: np.ndarray
    demand: np.ndarray
    last_use_s: np.ndarray
    hbm_encoding: np.ndarray
    fallback_level: np.ndarray
    in_flight_encoding: np.ndarray
    placed_at_s: np.ndarray
    regenerable: np.ndarray
    hbm_tier: np.ndarray
    host_tier: np.ndarray
    cxl_tier: np.ndarray

    @property
    def count(self) -> int:
        return len(self.model)


@dataclass(frozen=True)
class TierArrays:
    """Tier instances. ``reserved_bytes`` is memory the pool's blocks cannot use (other tenants,
    allocator slack); storage's capacity is effectively unbounded."""

    tier_ids: tuple[str, ...]
    level: np.ndarray
    capacity_bytes: np.ndarray
    reserved_bytes: np.ndarray

    @property
    def usable_bytes(self) -> np.ndarray:
        return np.asarray(self.capacity_bytes - self.reserved_bytes)


@dataclass(frozen=True)
class LinkModel:
    """Bandwidth and latency of each level-to-level link, ``[4, 4]`` by (source, destination);
    0 GB/s means no such link. ``regenerate_gbps`` is the rebuild throughput of a regenerator."""

    gbps: np.ndarray
    latency_s: np.ndarray
    regenerate_gbps: float = 50.0

    def seconds(self, src: np.ndarray, dst: int, nbytes: np.ndarray) -> np.ndarray:
        """Transfer time of ``nbytes`` from levels ``src`` to level ``dst`` (vectorized)."""
        gbps = self.gbps[src, dst]
        with np.errstate(divide="ignore"):
            seconds: np.ndarray = self.latency_s[src, dst] + np.where(
                gbps > 0, nbytes / (gbps * 1e9), np.inf
            )
        return seconds


@dataclass(frozen=True)
class Telemetry:
    """What the pool observed since the last step.

    Attributes:
        now_s: the clock (injected: tests use a fake one).
        layer_time_s: ``[M, P]`` time per schedule position measured since the last step, ``nan``
            where not measured.
        current_position: ``[M]`` the position each model executes now, ``NONE`` when idle.
        concurrency: ``[M]`` sequences running per model.
        route_step, route_model, route_layer, route_expert: router choices in the long form of
            DESIGN section 7, one row per selected expert (layer is the model's layer index).
        link_busy_fraction: ``[4, 4]`` share of each link's bandwidth already used by transfers
            in flight.
    """

    now_s: float
    layer_time_s: np.ndarray
    current_position: np.ndarray
    concurrency: np.ndarray
    route_step: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    route_model: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    route_layer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    route_expert: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    link_busy_fraction: np.ndarray = field(default_factory=lambda: np.zeros((4, 4)))


@dataclass(frozen=True)
class ModelShapes:
    """Per model: schedule positions (layers + 2), layers, and experts per MoE layer (0 for a
    dense model)."""

    positions: np.ndarray
    layers: np.ndarray
    experts: np.ndarray


@dataclass(frozen=True)
class Snapshot:
    encodings: EncodingTable
    blocks: BlockArrays
    tiers: TierArrays
    links: LinkModel
    models: ModelShapes
    telemetry: Telemetry

    def validate(self) -> None:
        """Check shapes and ranges; raise ValueError naming the array and what was expected."""
        n, e = self.blocks.count, len(self.encodings.encodings)
        m, t = len(self.models.positions), len(self.tiers.tier_ids)
        if not len(self.models.layers) == len(self.models.experts) == m:
            raise ValueError(
                f"models.positions, layers and experts have lengths {m}, "
                f"{len(self.models.layers)}, {len(self.models.experts)}; expected one per model"
            )
        b = self.blocks
        for name in BlockArrays.__dataclass_fields__:
            value = getattr(b, name)
            if name == "block_ids":
                if len(value) != n:
                    raise ValueError(f"blocks.block_ids has {len(value)} ids; expected {n}")
                continue
            expected = (n, e) if name in ("nbytes", "sensitivity") else (n,)
            if value.shape != expected:
                raise ValueError(f"blocks.{name} has shape {value.shape}; expected {expected}")
        if n and (b.model.min() < 0 or b.model.max() >= m):
            raise ValueError(
                f"blocks.model must be in [0, {m}); got {b.model.min()}..{b.model.max()}"
            )
        if n and bool(np.any(b.position >= self.models.positions[b.model])):
            raise ValueError("blocks.position must be < models.positions of the block's model")
        for name in ("hbm_encoding", "in_flight_encoding"):
            value = getattr(b, name)
            if n and (value.min() < NONE or value.max() >= e):
                raise ValueError(f"blocks.{name} must index the {e} encodings or be {NONE}")
        if n and not bool(np.isin(b.fallback_level, (HOST, CXL, STORAGE)).all()):
            raise ValueError("blocks.fallback_level must be HOST, CXL or STORAGE")
        if bool(np.any(b.nbytes <= 0)):
            raise ValueError("blocks.nbytes must be > 0 for every block and encoding")
        if bool(np.any(np.isnan(b.sensitivity))) or bool(np.any(b.sensitivity < 0)):
            raise ValueError("blocks.sensitivity must be >= 0 (inf for unknown), never nan")
        for name in ("hbm_tier", "host_tier", "cxl_tier"):
            value = getattr(b, name)
            if n and (value.max() >= t or value.min() < NONE):
                raise ValueError(f"blocks.{name} must index the {t} tiers or be {NONE}")
        if n and bool(np.any(b.hbm_tier == NONE)):
            raise ValueError("every block needs an hbm_tier (the device that computes it)")
        if self.links.gbps.shape != (4, 4) or self.links.latency_s.shape != (4, 4):
            raise ValueError("links.gbps and links.latency_s must have shape (4, 4)")
        tel = self.telemetry
        p = int(self.models.positions.max()) if m else 0
        if tel.layer_time_s.shape != (m, p):
            raise ValueError(
                f"telemetry.layer_time_s has shape {tel.layer_time_s.shape}; expected {(m, p)}"
            )
        if tel.current_position.shape != (m,) or tel.concurrency.shape != (m,):
            raise ValueError(f"telemetry.current_position and concurrency must have shape ({m},)")
