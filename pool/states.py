"""The seven block states, the explicit transition table, and the derivation of a state from copies.

States are never compared by order. A block's state is derived (:func:`derive_state`) from its
copies; a registry that changes a block's copies derives the state before and after and calls
:func:`check_transition`, which refuses any pair not in :data:`ALLOWED_TRANSITIONS`. The table is
what forces, for example, every arrival in HBM to be announced as an in-flight copy first (COLD
cannot become PREMIUM without passing through PROMOTING).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from pool.encoding import Encoding, Precision
from pool.errors import IllegalTransitionError
from pool.tiers import TierKind


class BlockState(enum.Enum):
    PREMIUM = "premium"  # HBM, full precision
    COMPACT = "compact"  # HBM, reduced precision, directly usable
    HOLDING = "holding"  # HBM, compressed: decode before use
    WARM = "warm"  # HOST or PEER
    COLD = "cold"  # CXL or STORAGE
    PROMOTING = "promoting"  # a copy in flight toward HBM, none usable there yet
    REGENERABLE = "regenerable"  # no fast copy; a registered regenerator rebuilds it


S = BlockState
# Every state change a block may make in one step. Reasons, by row:
# - PREMIUM/COMPACT may shrink in place, or lose their HBM copy (spill to a warmer tier's copy).
# - COMPACT -> PREMIUM: a full-precision upgrade lands while the compact copy kept serving.
# - COMPACT -> PROMOTING: the compact copy is dropped to make room for an upgrade in flight.
#   PREMIUM -> PROMOTING is refused: a full-precision copy is never dropped for a smaller copy
#   still in flight (the protocol: a block's best usable HBM copy stays until its successor
#   lands, except to make room for an upgrade).
# - HOLDING must decode before use: it goes through PROMOTING, or is evicted.
# - WARM/COLD/REGENERABLE reach HBM only through PROMOTING; COLD/REGENERABLE may gain a host copy.
# - PROMOTING lands (PREMIUM, COMPACT, or HOLDING for a compressed prefetch) or is cancelled or
#   fails, falling back to whatever copy remains.
# - COLD <-> REGENERABLE: a regenerator registered or removed.
ALLOWED_TRANSITIONS: frozenset[tuple[BlockState, BlockState]] = frozenset(
    {
        (S.PREMIUM, S.COMPACT),
        (S.PREMIUM, S.HOLDING),
        (S.PREMIUM, S.WARM),
        (S.PREMIUM, S.COLD),
        (S.PREMIUM, S.REGENERABLE),
        (S.COMPACT, S.PREMIUM),
        (S.COMPACT, S.HOLDING),
        (S.COMPACT, S.PROMOTING),
        (S.COMPACT, S.WARM),
        (S.COMPACT, S.COLD),
        (S.COMPACT, S.REGENERABLE),
        (S.HOLDING, S.PROMOTING),
        (S.HOLDING, S.WARM),
        (S.HOLDING, S.COLD),
        (S.HOLDING, S.REGENERABLE),
        (S.WARM, S.PROMOTING),
        (S.WARM, S.COLD),
        (S.WARM, S.REGENERABLE),
        (S.COLD, S.PROMOTING),
        (S.COLD, S.WARM),
        (S.COLD, S.REGENERABLE),
        (S.REGENERABLE, S.PROMOTING),
        (S.REGENERABLE, S.WARM),
        (S.REGENERABLE, S.COLD),
        (S.PROMOTING, S.PREMIUM),
        (S.PROMOTING, S.COMPACT),
        (S.PROMOTING, S.HOLDING),
        (S.PROMOTING, S.WARM),
        (S.PROMOTING, S.COLD),
        (S.PROMOTING, S.REGENERABLE),
    }
)


def check_transition(block_id: str, old: BlockState, new: BlockState) -> None:
    """Refuse a state change not in :data:`ALLOWED_TRANSITIONS`; staying put is always allowed.

    Raises:
        IllegalTransitionError: naming the block, both states and the states allowed from ``old``.
    """
    if old is new or (old, new) in ALLOWED_TRANSITIONS:
        return
    allowed = sorted(b.value for a, b in ALLOWED_TRANSITIONS if a is old)
    raise IllegalTransitionError(
        f"block {block_id!r}: transition {old.value} -> {new.value} is not allowed; "
        f"from {old.value} the allowed states are {allowed}"
    )


class CopyStatus(enum.Enum):
    READY = "ready"  # complete and verified: usable or decodable
    IN_FLIGHT = "in-flight"  # being written by a transfer; not readable yet


@dataclass(frozen=True)
class Copy:
    """One copy of a block: a tier instance, its kind, an encoding, and whether it is complete.

    ``device`` is the accelerator index of an HBM copy (``None`` elsewhere); it decides whether an
    HBM copy is local to a consumer or reached as a peer.
    """

    tier_id: str
    tier_kind: TierKind
    encoding: Encoding
    status: CopyStatus = CopyStatus.READY
    device: int | None = None


def derive_state(
    copies: Iterable[Copy],
    *,
    regenerable: bool = False,
    device: int | None = None,
) -> BlockState:
    """A block's state, from its copies, as seen by a consumer on ``device``.

    With ``device=None`` every HBM copy counts as local; otherwise HBM copies on other devices are
    peers (``WARM``). The rules, first match wins: a ready local HBM copy at full precision and
    directly usable is PREMIUM; at reduced precision, COMPACT; a copy in flight toward local HBM
    is PROMOTING; a ready compressed local HBM copy is HOLDING; a ready HOST, PEER or remote HBM
    copy is WARM; a registered regenerator is REGENERABLE; anything else (CXL, STORAGE) is COLD.
    A block with no ready copy at all and no regenerator is COLD too: the storage copy is the
    source of truth, and its absence is the storage tier's error to report, not a state.
    """
    usable_full = usable_reduced = holding = in_flight = warm = False
    for copy in copies:
        local_hbm = copy.tier_kind is TierKind.HBM and (device is None or copy.device == device)
        if copy.status is CopyStatus.IN_FLIGHT:
            in_flight = in_flight or local_hbm
            continue
        if local_hbm:
            if not copy.encoding.directly_usable:
                holding = True
            elif copy.encoding.precision is Precision.FULL:
                usable_full = True
            else:
                usable_reduced = True
        elif copy.tier_kind in (TierKind.HOST, TierKind.PEER, TierKind.HBM):
            warm = True
    if usable_full:
        return BlockState.PREMIUM
    if usable_reduced:
        return BlockState.COMPACT
    if in_flight:
        return BlockState.PROMOTING
    if holding:
        return BlockState.HOLDING
    if warm:
        return BlockState.WARM
    if regenerable:
        return BlockState.REGENERABLE
    return BlockState.COLD
