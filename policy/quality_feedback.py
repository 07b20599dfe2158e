"""Quality feedback: the drift a placement realized, measured from router telemetry, against the
drift the step predicted for the same layer visits; the budget the veto enforces is tightened by
their decayed ratio, never loosened.

Why: the veto bounds the *predicted* quality cost, ``sum p(use) * sensitivity`` over the HBM
blocks at their target encodings. What a model then suffers is the drift of the blocks it
actually reads, at the encoding they had: more than predicted where p(use) underestimates the
use of reduced-precision experts, or where demand promotions at reduced precision add drift the
plan did not target. The step learns that gap from what it already receives: the router choices
since its last step (``Telemetry.route_*``) and, for each chosen expert, the encoding its copy
has now (the HBM copy; else a copy in flight; else full precision, no drift).

Per step, with ``w = config.quality_feedback_decay`` (0: off, the step is unchanged):

- realized: the sum over the distinct (step, model, layer, expert) choices of the experts the
  previous plan targeted in HBM, of each one's sensitivity at that encoding (a demand promotion
  of a block the plan did not target is left out: the caller keeps those within the headroom the
  plan left, ``policy.plan.Plan.demand_encoding``);
- predicted: the sum over the distinct (step, model, layer) visits among them of the previous
  plan's expected drift of one visit of that layer's experts (``p(use) * sensitivity`` at their
  target encodings, the plan's per-block quality cost, summed per layer);
- both are decayed sums (``x <- (1 - w) * x + window``); their ratio, each with one configured
  budget ``B`` of drift added as a prior, ``r = (realized + B) / (predicted + B)``, is the factor
  by which realized drift exceeded the prediction. The prior keeps a window with little
  predicted drift (a few reads of heavy-tailed sensitivities) from swinging ``r``: only
  ``r > 1`` acts, so noise alone would tighten on average (the replay's synthetic qwen3 at
  50 % HBM stalled 4.83 ms a token without feedback, 5.60 with it but no prior, 4.98 with it).

Only experts are measured and corrected: a block that is not an expert is used once per pass
(p(use) = 1 for a running model), so its predicted drift is its realized drift. With ``D`` the
previous plan's drift of those blocks, the veto's budget ``B`` becomes
``B' = min(B, (B + (r - 1) D) / r)`` when ``r > 1`` (else ``B``): a placement of ``D`` plus expert
drift ``X`` within ``B'`` realizes ``D + r X <= B`` as long as ``D`` is what it was.

Pure numpy, no Ray; the state it keeps is ``PolicyState.quality_feedback``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from policy.config import PolicyConfig
from policy.snapshot import NONE, Snapshot
from policy.state import PolicyState, QualityFeedback
from policy.static import Static


def _feedback(state: PolicyState, static: Static) -> QualityFeedback:
    """The state's feedback record, made (or its expert lookup rebuilt) for ``static``."""
    fb = state.quality_feedback
    if fb is not None and fb.static is static:
        return fb
    m, n_layers, n_experts = state.shape
    block_of = np.full(m * n_layers * n_experts, NONE, np.int64)
    block_of[static.expert_flat] = static.expert_rows
    if fb is None or len(fb.expected_by_layer) != m * n_layers:  # new, or the grid changed
        fb = QualityFeedback(block_of, np.zeros(m * n_layers))
    # The blocks may have changed: the last plan's figures no longer apply.
    state.quality_feedback = fb = replace(fb, block_of=block_of, static=static, planned=False)
    return fb


def window_drift(
    snapshot: Snapshot, state: PolicyState, feedback: QualityFeedback
) -> tuple[float, float]:
    """(realized, predicted) drift of the router choices in ``snapshot.telemetry``: realized at
    the encodings the chosen experts have now, predicted from ``feedback.expected_by_layer``
    for the layer visits they make. Choices of an unknown (model, layer, expert) are skipped."""
    tel = snapshot.telemetry
    if len(tel.route_step) == 0:
        return 0.0, 0.0
    m, n_layers, n_experts = state.shape
    layer = tel.route_model.astype(np.int64) * n_layers + tel.route_layer
    known = (tel.route_layer >= 0) & (tel.route_layer < n_layers) & (tel.route_expert >= 0)
    known &= (tel.route_expert < n_experts) & (tel.route_model >= 0) & (tel.route_model < m)
    layer = layer[known]
    flat = layer * n_experts + tel.route_expert[known]
    steps = tel.route_step[known].astype(np.int64) - int(tel.route_step[known].min(initial=0))
    size = m * n_layers * n_experts
    choice = np.unique(steps * size + flat)
    block = feedback.block_of[choice % size]
    block = block[block != NONE]
    block = block[feedback.in_plan[block]]  # a demand the plan did not target: not predicted
    blocks = snapshot.blocks
    encoding = blocks.hbm_encoding[block]
    flying = blocks.in_flight_encoding[block]
    encoding = np.where(encoding != NONE, encoding, np.where(flying != NONE, flying, 0))
    realized = float(blocks.sensitivity[block, encoding].sum())
    visit = np.unique(steps * (m * n_layers) + layer)
    predicted = float(feedback.expected_by_layer[visit % (m * n_layers)].sum())
    return realized, predicted


def budget_config(
    snapshot: Snapshot, state: PolicyState, static: Static, config: PolicyConfig
) -> PolicyConfig:
    """Fold this step's router choices into the feedback state (in place) and return the config
    whose ``quality_budget`` the veto is to enforce: ``config`` itself when feedback is off
    (``quality_feedback_decay == 0``; the state is then not touched) or realized drift has not
    exceeded the prediction, else a copy with the budget tightened as the module says. Before a
    plan was remembered (``remember_plan``) for the current blocks nothing is folded."""
    decay = config.quality_feedback_decay
    if decay == 0:
        return config
    fb = _feedback(state, static)
    if fb.planned:
        realized, predicted = window_drift(snapshot, state, fb)
        fb.realized_drift = (1 - decay) * fb.realized_drift + realized
        fb.predicted_drift = (1 - decay) * fb.predicted_drift + predicted
    budget = config.quality_budget
    ratio = (fb.realized_drift + budget) / (fb.predicted_drift + budget) if budget > 0 else fb.ratio
    if ratio <= 1.0:  # (0 when nothing predicted was used and the budget is 0)
        return config
    tightened = (budget + (ratio - 1.0) * fb.certain_drift) / ratio
    if tightened >= budget:
        return config
    return config.model_copy(update={"quality_budget": tightened})


def remember_plan(
    state: PolicyState, static: Static, cost: np.ndarray, hbm: np.ndarray, config: PolicyConfig
) -> None:
    """Keep, per (model, layer), the expected drift of one visit of its experts under this
    step's plan (``cost``: per block, ``p(use) * sensitivity`` at its target encoding), for the
    next step's ``budget_config``. Does nothing when feedback is off."""
    if config.quality_feedback_decay == 0:
        return
    fb = _feedback(state, static)
    m, n_layers, n_experts = state.shape
    layer = static.expert_flat // n_experts
    expert_cost = cost[static.expert_rows]
    fb.expected_by_layer = np.bincount(layer, weights=expert_cost, minlength=m * n_layers)
    fb.certain_drift = max(float(cost.sum()) - float(expert_cost.sum()), 0.0)
    fb.in_plan = hbm != NONE
    fb.planned = True
