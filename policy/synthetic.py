"""Synthetic MoE pools and router telemetry, for benchmarks and property tests.

Routing has named knobs (see :class:`RoutingKnobs`): per-layer popularity skew (Zipf), token-to-
token persistence, cross-layer correlation and concurrent sequences. Calibration against published
measurements belongs to the trace-replay benchmark (issue 4); the defaults here are only
plausible.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from policy.builder import PoolShape, encoding_sizes, tiers_for
from policy.snapshot import (
    KIND_CODES,
    NONE,
    STORAGE,
    BlockArrays,
    EncodingTable,
    ModelShapes,
    Snapshot,
    Telemetry,
)
from pool.blocks import BlockKind
from pool.encoding import PRECISION_BITS, Precision


@dataclass(frozen=True)
class MoELayout:
    """One MoE model: ``layers`` MoE layers of ``experts`` experts (top-``top_k``), each layer
    with ``dense_per_layer`` dense blocks (attention, norms, router), plus embedding and head."""

    layers: int = 58
    experts: int = 256
    top_k: int = 8
    dense_per_layer: int = 4
    expert_bytes: int = 3 * 7168 * 2048 * 2  # DeepSeek-V3 expert, bfloat16
    dense_bytes: int = 7168 * 7168 * 2 // 2

    @property
    def blocks(self) -> int:
        return self.layers * (self.experts + self.dense_per_layer) + 2


@dataclass(frozen=True)
class RoutingKnobs:
    zipf_exponent: float = 1.0  # per-layer popularity skew
    persistence: float = 0.5  # logit bonus (in nats) for an expert chosen at the last step
    cross_layer: float = 1.0  # logit bonus for the experts that follow last layer's choices
    concurrency: int = 4  # sequences decoded together


def synthetic_pool(
    layout: MoELayout,
    replicas: int,
    hbm_fraction: float,
    shape: PoolShape | None = None,
    seed: int = 0,
    total_blocks: int | None = None,
) -> Snapshot:
    """``replicas`` copies of ``layout`` on one device whose HBM holds ``hbm_fraction`` of them
    at full precision; host memory holds half; every block starts cold in storage. With
    ``total_blocks``, the last replica gets extra dense blocks (tensor shards of its last layer)
    up to that count."""
    rng = np.random.default_rng(seed)
    shape = shape or PoolShape()
    per_model = layout.blocks
    n = replicas * per_model
    model = np.repeat(np.arange(replicas, dtype=np.int32), per_model)
    local = np.tile(np.arange(per_model), replicas)
    if total_blocks is not None:
        if total_blocks < n:
            raise ValueError(f"total_blocks {total_blocks} is below the {n} blocks of the replicas")
        pad = total_blocks - n
        model = np.concatenate([model, np.full(pad, replicas - 1, np.int32)])
        # Extra dense blocks of the last layer: local indices past the head, mapped below.
        local = np.concatenate([local, np.full(pad, -1)])
        n = total_blocks
    experts_end = layout.layers * layout.experts
    is_expert = (local >= 0) & (local < experts_end)
    dense_index = local - experts_end
    layer = np.where(is_expert, local // layout.experts, dense_index // layout.dense_per_layer)
    layer = np.where(local < 0, layout.layers - 1, layer)
    position = (layer + 1).astype(np.int32)
    embed = local == per_model - 2
    head = local == per_model - 1
    position[embed] = 0
    position[head] = layout.layers + 1
    kind = np.full(n, KIND_CODES[BlockKind.DENSE], np.int8)
    kind[is_expert] = KIND_CODES[BlockKind.EXPERT]
    kind[embed] = KIND_CODES[BlockKind.EMBEDDING]
    kind[head] = KIND_CODES[BlockKind.HEAD]
    expert = np.where(is_expert, local % layout.experts, NONE).astype(np.int32)
    full = np.where(is_expert, layout.expert_bytes, layout.dense_bytes).astype(np.int64)
    e = len(shape.encodings)
    nbytes = encoding_sizes(full, shape.size_ratios[:e])
    # Sensitivity: drift of one block at each precision; first and last layers and dense blocks
    # far more sensitive (a log-normal spread around a per-precision base).
    base = np.array([0.0, 2e-5, 1e-5, 2e-4, 2e-4])[:e]
    spread = rng.lognormal(0.0, 1.0, n)
    edge = (position <= 1) | (position >= layout.layers)
    factor = spread * np.where(edge, 20.0, 1.0) * np.where(is_expert, 1.0, 5.0)
    sensitivity = factor[:, None] * base[None, :] / layout.experts
    tiers, host, cxl = tiers_for(
        replace(
            shape,
            hbm_bytes=(int(hbm_fraction * full.sum()),),
            host_bytes=int(0.5 * full.sum()),
        )
    )
    blocks = BlockArrays(
        block_ids=_LazyIds(n),  # type: ignore[arg-type]
        model=model,
        position=position,
        kind=kind,
        expert=expert,
        nbytes=nbytes,
        sensitivity=sensitivity,
        floor_bits=np.full(n, PRECISION_BITS[Precision.INT4], np.int16),
        leased=np.zeros(n, bool),
        demand=np.zeros(n, bool),
        last_use_s=np.zeros(n),
        hbm_encoding=np.full(n, NONE, np.int64),
        fallback_level=np.full(n, STORAGE, np.int64),
        in_flight_encoding=np.full(n, NONE, np.int64),
        placed_at_s=np.full(n, -1e9),
        regenerable=np.zeros(n, bool),
        hbm_tier=np.zeros(n, np.int64),
        host_tier=np.full(n, host, np.int64),
        cxl_tier=np.full(n, cxl, np.int64),
    )
    models = ModelShapes(
        positions=np.full(replicas, layout.layers + 2, np.int32),
        layers=np.full(replicas, layout.layers, np.int32),
        experts=np.full(replicas, layout.experts, np.int32),
    )
    telemetry = Telemetry(
        now_s=0.0,
        layer_time_s=np.full((replicas, layout.layers + 2), np.nan),
        current_position=np.full(replicas, NONE, np.int32),
        concurrency=np.zeros(replicas, np.int32),
    )
    return Snapshot(
        EncodingTable(shape.encodings, shape.decode_gbps[:e]),
        blocks,
        tiers,
        shape.links,
        models,
        telemetry,
    )


class _LazyIds:
    """Block ids made on demand, so that a million-block synthetic pool holds no strings."""

    def __init__(self, n: int):
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> str:
        return f"synthetic/block.{index}"


@dataclass
class Router:
    """Generates router choices step by step with the knobs of :class:`RoutingKnobs`."""

    layout: MoELayout
    replicas: int
    knobs: RoutingKnobs = field(default_factory=RoutingKnobs)
    seed: int = 0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self._rng = rng
        m, layers, experts = self.replicas, self.layout.layers, self.layout.experts
        ranks = np.argsort(rng.random((m, layers, experts)), axis=2) + 1.0
        self._log_popularity = -self.knobs.zipf_exponent * np.log(ranks)
        self._follower = rng.integers(0, experts, (m, layers, experts))
        self._previous = np.zeros((m, self.knobs.concurrency, layers, experts), bool)
        self.step_index = 0

    def step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One decode step for every replica: (step, model, layer, expert) rows, long form."""
        m, c = self.replicas, self.knobs.concurrency
        layers, experts, k = self.layout.layers, self.layout.experts, self.layout.top_k
        chosen = np.zeros((m, c, layers, experts), bool)
        follow_bonus = np.zeros((m, c, experts))
        for layer in range(layers):
            gumbel = -np.log(-np.log(self._rng.random((m, c, experts))))
            logits = self._log_popularity[:, None, layer, :] + gumbel
            logits += self.knobs.persistence * self._previous[:, :, layer, :]
            logits += follow_bonus
            top = np.argpartition(-logits, k - 1, axis=2)[:, :, :k]
            np.put_along_axis(chosen[:, :, layer, :], top, True, axis=2)
            follow_bonus = np.zeros((m, c, experts))
            followers = np.take_along_axis(
                np.broadcast_to(self._follower[:, None, layer, :], (m, c, experts)), top, axis=2
            )
            np.put_along_axis(follow_bonus, followers, self.knobs.cross_layer, axis=2)
        self._previous = chosen
        union = chosen.any(axis=1)  # [m, layers, experts]
        model, chosen_layer, expert = np.nonzero(union)
        step = np.full(len(model), self.step_index, np.int64)
        self.step_index += 1
        return (
            step,
            model.astype(np.int32),
            chosen_layer.astype(np.int32),
            expert.astype(np.int32),
        )


def drawn_layer_times(snapshot: Snapshot, rng: np.random.Generator) -> np.ndarray:
    """Per-position layer times for one step of the synthetic benchmarks (``[models,
    positions]``): about 0.2 ms a layer, normal with a 10 % spread, at least 10 us."""
    models, positions = snapshot.telemetry.layer_time_s.shape
    times: np.ndarray = rng.normal(2e-4, 2e-5, (models, positions)).clip(1e-5)
    return times


def routed_telemetry(
    snapshot: Snapshot, router: Router, tick: int, now_s: float, layer_time_s: np.ndarray
) -> Telemetry:
    """The snapshot's telemetry for step ``tick``: the router's next choices, every model at
    position ``1 + tick % (positions - 2)`` with the router's concurrency, and ``layer_time_s``
    (``[models, positions]``)."""
    models = len(snapshot.models.layers)
    positions = snapshot.telemetry.layer_time_s.shape[1]
    step_rows, model, layer, expert = router.step()
    return replace(
        snapshot.telemetry,
        now_s=now_s,
        route_step=step_rows,
        route_model=model,
        route_layer=layer,
        route_expert=expert,
        current_position=np.full(models, 1 + tick % (positions - 2), np.int32),
        concurrency=np.full(models, router.knobs.concurrency, np.int32),
        layer_time_s=layer_time_s,
    )
