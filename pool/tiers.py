"""Tier kinds and tier instance specs.

A tier instance is a piece of memory owned by exactly one Ray actor (``actors/``). Its spec is a
frozen pydantic model because it arrives from configuration: a bad value is refused with the field
and the value named.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TierKind(enum.Enum):
    """Kinds of memory, fastest first in the table of DESIGN section 1.

    ``PEER`` is how a consumer sees another accelerator's ``HBM``; it is never configured as an
    instance of its own.
    """

    HBM = "hbm"
    PEER = "peer"
    HOST = "host"
    CXL = "cxl"
    STORAGE = "storage"


class TierSpec(BaseModel):
    """One tier instance.

    Attributes:
        tier_id: unique name, e.g. ``node0/hbm0``.
        kind: the tier kind; ``peer`` is not configurable (it is another device's ``hbm``).
        capacity_bytes: bytes this instance may hold; ``None`` only for ``storage`` (bounded by
            the filesystem).
        node: the Ray node (id or label) the owning actor is placed on.
        device: the accelerator index for ``hbm``; ``None`` for the other kinds.
        emulated: ``True`` when the tier is CPU memory standing in for the named kind (an HBM tier
            on a machine with no GPU, a CXL tier on a machine with no CXL node). Every report marks
            an emulated tier as such.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tier_id: str = Field(min_length=1)
    kind: TierKind
    capacity_bytes: int | None = Field(default=None, gt=0)
    node: str = "local"
    device: int | None = Field(default=None, ge=0)
    emulated: bool = False

    @model_validator(mode="after")
    def _check_kind_fields(self) -> TierSpec:
        if self.kind is TierKind.PEER:
            raise ValueError(
                f"tier {self.tier_id!r}: kind 'peer' is not configurable; configure the other "
                "device's 'hbm' tier and the pool reaches it as a peer"
            )
        if self.capacity_bytes is None and self.kind is not TierKind.STORAGE:
            raise ValueError(
                f"tier {self.tier_id!r}: kind {self.kind.value!r} needs capacity_bytes "
                "(only 'storage' may be unbounded)"
            )
        if (self.device is not None) != (self.kind is TierKind.HBM):
            raise ValueError(
                f"tier {self.tier_id!r}: device={self.device!r} with kind {self.kind.value!r}; "
                "expected a device index exactly for 'hbm' tiers"
            )
        return self
