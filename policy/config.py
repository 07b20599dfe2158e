"""The policy's configuration: one pydantic model, validated field by field.

Units are in the names. Every knob has a default that works for a single-node pool; a bad value is
refused with the field, the value and the allowed range named (pydantic's ValidationError).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PolicyConfig(BaseModel):
    """Knobs of the control step (DESIGN section 2)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- observe / predict ---------------------------------------------------------------------
    layer_time_decay: float = Field(0.2, gt=0, le=1, description="EMA weight of a new layer time")
    default_layer_time_s: float = Field(1e-3, gt=0, description="layer time before any telemetry")
    prior_visits: float = Field(
        8.0, ge=0, description="weight, in visits, of a layer's mean as each expert's prior"
    )
    popularity_decay: float = Field(
        0.05, gt=0, le=1, description="EMA weight of one step's router choices in popularity"
    )
    persistence_decay: float = Field(
        0.05,
        gt=0,
        le=1,
        description="EMA weight of one step in the token-to-token persistence rate",
    )
    coactivation_decay: float = Field(
        0.05, gt=0, le=1, description="EMA weight of one step in cross-layer co-activation"
    )
    coactivation_max_experts: int = Field(
        512, ge=0, description="models with more experts per layer skip co-activation (E^2 state)"
    )
    coactivation_pairs_per_step: int = Field(
        4096, ge=1, description="co-activation pairs learned per step, sampled beyond this"
    )
    coactivation_max_bytes: int = Field(
        256 << 20, ge=0, description="total co-activation state; models past it go without"
    )
    predicted_set_threshold: float = Field(
        0.5, gt=0, lt=1, description="an expert is in the predicted set when p(use) >= this"
    )
    idle_use_probability: float = Field(
        0.05, ge=0, le=1, description="p(use) of a block of a model with no sequence running"
    )

    # -- score ---------------------------------------------------------------------------------
    imminence_s: float = Field(
        0.05, gt=0, description="time scale of imminence: value weight 1 / (1 + t_next / this)"
    )
    quality_weight_s: float = Field(
        0.0,
        ge=0,
        description="seconds of stall one unit of predicted drift is worth when scoring; 0 lets "
        "scoring chase efficiency and leaves quality to the veto",
    )
    hbm_headroom_fraction: float = Field(
        0.05, ge=0, lt=1, description="HBM kept free for demand promotions"
    )
    hysteresis_multiple: float = Field(
        2.0, ge=0, description="a move must gain more than this multiple of its transfer cost"
    )
    hysteresis_horizon_s: float = Field(
        1.0, gt=0, description="the value a move earns is counted over this horizon"
    )
    min_dwell_s: float = Field(0.5, ge=0, description="a block stays this long where it moved")
    precision_hysteresis: bool = Field(
        True,
        description="precision upgrades with spare HBM obey the dwell time and the hysteresis "
        "penalty, and count decode time over the horizon (policy.score.refine); False: they "
        "follow the next use's imminence (the behaviour before, kept for comparison)",
    )
    budget_hysteresis: bool = Field(
        False,
        description="the quality budget's fixes to an encoding a block holds in HBM already "
        "count 1 / (1 + hysteresis_multiple) of their extra bytes, so that the same blocks stay "
        "fixed from step to step (policy.veto); off by default: see the README's figures",
    )

    # -- veto ----------------------------------------------------------------------------------
    quality_budget: float = Field(
        0.01,
        ge=0,
        description="bound on the sum over blocks of predicted drift at the chosen precision, "
        "weighted by predicted use",
    )
    quality_feedback_decay: float = Field(
        0.0,
        ge=0,
        le=1,
        description="EMA weight of one step in the realized/predicted drift of the experts used "
        "(policy.quality_feedback), by which the veto's budget is tightened (never loosened). "
        "0: off",
    )

    # -- schedule ------------------------------------------------------------------------------
    tick_s: float = Field(0.01, gt=0, description="period of the control loop")
    safety_margin_s: float = Field(0.002, ge=0, description="deadline slack before next use")
    imminent_horizon_s: float = Field(
        0.02, gt=0, description="a promotion needed within this is IMMINENT, later PREFETCH"
    )
    demotion_link_busy_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="demotions wait while a link's budget this tick is used beyond this",
    )
    max_transitions_per_step: int = Field(
        65536, ge=1, description="transitions beyond this wait for the next step, by priority"
    )

    @model_validator(mode="after")
    def _check_horizons(self) -> PolicyConfig:
        if self.imminent_horizon_s < self.safety_margin_s:
            raise ValueError(
                f"imminent_horizon_s ({self.imminent_horizon_s}) must be >= safety_margin_s "
                f"({self.safety_margin_s})"
            )
        return self
