"""Request and response models of the admin API (pydantic: the API's edge, STYLE rule 2).

Responses are built from the controller's frozen dataclasses (``actors.admin_ops``) by attribute.
Numbers that can be non-finite inside the controller (an unknown time to next use) are ``null``
here, never ``Infinity``: every response is strict JSON that matches the published schema.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any, Literal

from annotated_types import Le
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, create_model

from actors.admin_ops import MAX_TICK_S
from actors.admin_views import AuditEntry, BlockDetail, DrainProgress, Page, PinGoal
from policy.config import PolicyConfig


class AuditKind(enum.Enum):
    TRANSITION = "transition"
    REJECTION = "rejection"  # a veto
    GOAL = "goal"
    EXECUTE = "execute"
    FAULT = "fault"
    LEASE = "lease"


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


class ErrorOut(BaseModel):
    """Every error but a validation error (422): one message naming what was wrong."""

    detail: str


class Health(_Out):
    status: Literal["ok"]
    namespace: str
    blocks: int
    models: int
    tiers: int
    tiers_alive: int
    pins: int
    drains: int


class DrainProgressOut(_Out):
    since_s: float = Field(description="when the drain was asked for (unix time)")
    copies_left: int = Field(description="copies the registry still has on the tier")
    bytes_left: int
    leased_copies_left: int = Field(description="of those, copies a live lease keeps there")
    done: bool


class TierOut(_Out):
    tier_id: str
    kind: str = Field(description="hbm, host, cxl or storage")
    node_id: str = Field(description="the Ray node its actor is pinned to")
    capacity_bytes: int | None = Field(description="null: unbounded (storage)")
    used_bytes: int | None = Field(description="as the tier actor accounts it; null: no answer")
    copies: int | None
    emulated: bool = Field(description="CPU memory standing in for device memory or CXL")
    alive: bool
    draining: bool
    drain: DrainProgressOut | None


class TierList(_Out):
    tiers: list[TierOut]


class BlockOut(_Out):
    block_id: str
    model: str
    layer: int
    kind: str
    expert: int | None
    state: str = Field(description="premium, compact, holding, warm, cold, promoting, ...")
    full_nbytes: int
    tiers: list[str] = Field(description="tiers holding a ready copy")
    pinned: bool


class _Paged(_Out):
    total: int = Field(description="items matching the filters, over all pages")
    offset: int
    limit: int
    next_offset: int | None = Field(description="offset of the next page; null on the last")


class BlockPage(_Paged):
    blocks: list[BlockOut]


class CopyOut(_Out):
    tier_id: str
    tier_kind: str
    encoding: str
    status: str = Field(description="in-flight, ready or evicting")
    epoch: int
    nbytes: int


class LeaseOut(_Out):
    lease_id: str
    holder: str
    tier_id: str
    encoding: str
    epoch: int
    expires_in_s: float


class AuditEntryOut(_Out):
    time_s: float = Field(description="unix time")
    kind: str = Field(description="transition, rejection (a veto), goal, execute, fault, lease")
    block_id: str = Field(description="empty for pool-wide records")
    detail: str
    to_state: str | None = Field(description="transitions: the state reached")
    rule: str | None = Field(description="rejections: the veto rule")


class AuditPage(_Paged):
    entries: list[AuditEntryOut]


class PinOut(_Out):
    block_id: str
    pinned: bool
    since_s: float | None = Field(description="when the pin was asked for (unix time)")
    satisfied: bool = Field(description="resident in its home HBM at full precision now")


class DrainOut(_Out):
    tier_id: str
    draining: bool
    progress: DrainProgressOut | None


class Goals(_Out):
    pins: list[PinOut]
    drains: list[DrainOut]


class DecisionOut(_Out):
    """The last control step's view of the block (null numbers: not known or unbounded)."""

    target_hbm_encoding: str | None = None
    target_fallback_level: int | None = None
    use_probability: float | None = None
    time_to_next_use_s: float | None = None
    value_density: float | None = None
    demand: bool = False
    rejections: list[str] = Field(default_factory=list)


class BlockDetailOut(_Out):
    block: BlockOut
    dtype: str
    shapes: dict[str, list[int]]
    floor: str = Field(description="the lowest precision the guardrail allows")
    sensitivity: dict[str, float] = Field(description="predicted drift per reduced precision")
    encodings: list[str] = Field(description="encodings of its copies, ready or not")
    copies: list[CopyOut]
    leases: list[LeaseOut]
    pin: PinOut
    decision: DecisionOut | None = Field(description="null before the first step saw the block")
    history: list[AuditEntryOut] = Field(description="its audit records, newest first")


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def pin_out(block_id: str, goal: PinGoal | None, satisfied: bool) -> PinOut:
    return PinOut(
        block_id=block_id,
        pinned=goal is not None,
        since_s=None if goal is None else goal.since_s,
        satisfied=satisfied,
    )


def drain_out(tier_id: str, progress: DrainProgress | None) -> DrainOut:
    return DrainOut(
        tier_id=tier_id,
        draining=progress is not None,
        progress=None if progress is None else DrainProgressOut.model_validate(progress),
    )


def block_detail_out(detail: BlockDetail) -> BlockDetailOut:
    decision = {k: _finite(v) for k, v in detail.decision.items()}
    return BlockDetailOut(
        block=BlockOut.model_validate(detail.block),
        dtype=detail.dtype,
        shapes={k: list(v) for k, v in detail.shapes.items()},
        floor=detail.floor,
        sensitivity={k: v for k, v in detail.sensitivity.items() if math.isfinite(v)},
        encodings=sorted({c.encoding for c in detail.copies}),
        copies=[CopyOut.model_validate(c) for c in detail.copies],
        leases=[LeaseOut.model_validate(le) for le in detail.leases],
        pin=pin_out(detail.block.block_id, detail.pin, detail.pin_satisfied),
        decision=DecisionOut.model_validate(decision) if decision else None,
        history=[AuditEntryOut.model_validate(e) for e in detail.history],
    )


def next_offset(page: Page, offset: int, limit: int) -> int | None:
    return offset + limit if offset + limit < page.total else None


def audit_page(page: Page, offset: int, limit: int) -> AuditPage:
    entries: tuple[AuditEntry, ...] = page.items
    return AuditPage(
        total=page.total,
        offset=offset,
        limit=limit,
        next_offset=next_offset(page, offset, limit),
        entries=[AuditEntryOut.model_validate(e) for e in entries],
    )


def _policy_update_model() -> type[BaseModel]:
    """PolicyConfig's fields, each optional (omitted: keep the current value), with the same
    ranges, plus what the controller requires (``actors.admin_ops.check_policy``): finite
    numbers and ``tick_s`` at most ``MAX_TICK_S``. Unknown fields are refused."""
    fields: dict[str, Any] = {}
    for name, info in PolicyConfig.model_fields.items():
        metadata: list[Any] = list(info.metadata)
        if info.annotation is float:
            metadata.append(AllowInfNan(False))
        if name == "tick_s":
            metadata.append(Le(MAX_TICK_S))
        annotated = (
            Annotated[info.annotation, *metadata]  # type: ignore[name-defined]
            if metadata
            else info.annotation  # a field without constraints (a flag)
        )
        fields[name] = (annotated | None, Field(None, description=info.description))
    model: type[BaseModel] = create_model(
        "PolicyUpdate",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Fields to change; every other field keeps its current value. The result must "
        "be a valid policy as a whole (e.g. imminent_horizon_s >= safety_margin_s).",
        **fields,
    )
    return model


PolicyUpdate = _policy_update_model()
