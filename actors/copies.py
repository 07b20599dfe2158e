"""A copy's record and a tier's placement, as the registry keeps them (``actors.registry``
re-exports them; this module imports nothing of the runtime, so the registry's parts can)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pool.encoding import Encoding
from pool.tiers import TierKind, TierSpec


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
    shared_of: str = ""  # a tied block's copy: the block whose copy (one buffer) it shares
    shared_epoch: int = 0  # with shared_of: the epoch of that block's copy


def buffer_of(c: CopyEntry) -> tuple[str, int]:
    """Which buffer a copy holds, as (block id, epoch) of the copy that made it: its own, or
    the one it shares. A share outlives its source's copy (the buffer is freed with its last
    holder), so a source copied in again holds another buffer than its old shares."""
    return (c.shared_of, c.shared_epoch) if c.shared_of else (c.block_id, c.epoch)
