"""The policy's carried state: what it has learned from telemetry across steps.

``step`` consumes a state and returns the next one. For speed the arrays are updated in place:
a caller must not reuse a state it passed to ``step`` (as with a donated buffer). Everything is
plain numpy, so a state can be saved and restored with the placement actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policy.config import PolicyConfig
from policy.snapshot import Snapshot
from policy.static import Static


@dataclass
class Coactivation:
    """Decayed counts of "expert f at layer l+1 followed expert e at layer l", for one model.

    Decay is lazy: stored values are divided by ``scale``, which shrinks each step, so a step
    touches only the pairs it observed. ``pairs[l, e, f] * scale`` is the decayed count.
    """

    pairs: np.ndarray  # [layers - 1, experts, experts]
    given: np.ndarray  # [layers - 1, experts]: decayed count of e chosen at l
    scale: float = 1.0

    def renormalize_if_needed(self) -> None:
        if self.scale < 1e-30:
            self.pairs *= self.scale
            self.given *= self.scale
            self.scale = 1.0


@dataclass
class PredictionQuality:
    """Counts of the predicted expert set against the experts then used."""

    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0

    @property
    def precision(self) -> float:
        predicted = self.true_positive + self.false_positive
        return self.true_positive / predicted if predicted else float("nan")

    @property
    def recall(self) -> float:
        used = self.true_positive + self.false_negative
        return self.true_positive / used if used else float("nan")


@dataclass
class QualityFeedback:
    """Realized against predicted drift of the experts used (``policy.quality_feedback``); kept
    only while ``PolicyConfig.quality_feedback_decay`` is on."""

    block_of: np.ndarray  # [M * L * E] the block row of each (model, layer, expert); NONE: none
    expected_by_layer: np.ndarray  # [M * L] the last plan's expected drift of one layer visit
    realized_drift: float = 0.0  # decayed sum
    predicted_drift: float = 0.0  # decayed sum
    certain_drift: float = 0.0  # the last plan's drift of the blocks that are not experts
    planned: bool = False  # expected_by_layer holds a plan's figures
    in_plan: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [N] targeted
    static: Static | None = None  # what block_of was built for

    @property
    def ratio(self) -> float:
        """Realized over predicted drift (1 before any prediction)."""
        return self.realized_drift / self.predicted_drift if self.predicted_drift > 0 else 1.0


@dataclass
class PolicyState:
    layer_time_s: np.ndarray  # [M, P] decayed time per schedule position
    popularity: np.ndarray  # [M, L, E] decayed share of steps in which the expert was chosen
    observed_concurrency: np.ndarray  # [M] decayed concurrency at which popularity was seen
    layer_visits: np.ndarray  # [M, L] visits folded into popularity (for its bias correction)
    persistence: np.ndarray  # [M] decayed P(chosen at step t | chosen at t - 1)
    last_selected: np.ndarray  # sorted flat (m, l, e): each layer's choice at its last visit
    coactivation: list[Coactivation | None]  # per model, None when it has too many experts
    predicted: np.ndarray  # [M, L, E] bool: the predicted set for each layer's next visit
    quality_total: PredictionQuality = field(default_factory=PredictionQuality)
    steps: int = 0
    static: Static | None = None  # derived from the snapshot's block descriptions, cached
    quality_feedback: QualityFeedback | None = None  # only with quality_feedback_decay > 0

    @property
    def shape(self) -> tuple[int, int, int]:
        m, layers, experts = self.popularity.shape
        return m, layers, experts


def initial_state(snapshot: Snapshot, config: PolicyConfig) -> PolicyState:
    models = snapshot.models
    m = len(models.positions)
    p = int(models.positions.max()) if m else 0
    layers = max(int(models.layers.max()) if m else 0, 1)
    experts = max(int(models.experts.max()) if m else 0, 1)
    layer_time = np.zeros((m, p))
    for i in range(m):
        layer_time[i, : models.positions[i]] = config.default_layer_time_s
    coactivation: list[Coactivation | None] = []
    budget = config.coactivation_max_bytes
    for i in range(m):
        e = int(models.experts[i])
        n_layers = int(models.layers[i])
        cost = 8 * (n_layers - 1) * e * (e + 1)
        if 0 < e <= config.coactivation_max_experts and n_layers > 1 and cost <= budget:
            budget -= cost
            coactivation.append(
                Coactivation(np.zeros((n_layers - 1, e, e)), np.zeros((n_layers - 1, e)))
            )
        else:
            coactivation.append(None)
    return PolicyState(
        layer_time_s=layer_time,
        popularity=np.zeros((m, layers, experts)),
        observed_concurrency=np.ones(m),
        layer_visits=np.zeros((m, layers)),
        persistence=np.zeros(m),
        last_selected=np.zeros(0, np.int64),
        coactivation=coactivation,
        predicted=np.zeros((m, layers, experts), dtype=bool),
    )
