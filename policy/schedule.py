"""Schedule: turn the vetoed targets into transfers and transitions for this tick.

Actions per block, from its current copies to its target:

- promote (no HBM copy yet) or upgrade (a bigger encoding): a transfer from the block's fallback
  level into HBM, with a deadline of next use less transfer, decode and a safety margin;
- change of compression only (HOLDING to usable, or back), or a smaller encoding: a local
  transcode in HBM (the HBM->HBM link);
- evict: drop the HBM copy (the fallback copy exists by definition, no transfer);
- a faster fallback (storage or CXL to host, storage to CXL): a copy into the warm tier; a slower
  one: drop the copy, or spill host to CXL;
- a copy in flight toward HBM that the target no longer wants: cancelled;
- a regenerable block whose only copy is in storage: rebuilt in HBM by its regenerator.

Priority classes: DEMAND (a lease waits) before IMMINENT (next use within the imminent horizon)
before PREFETCH before DEMOTION. Copies are admitted (:mod:`policy.admission`) by capacity
first: a copy starts only if its tier holds it with everything that exists during the tick. Then
each link gets ``gbps * tick_s`` bytes per tick, less what transfers in flight already use, in
class, then deadline, order (the first on an idle link always goes, however large); demotions
wait while their link is busier than ``demotion_link_busy_fraction``. The rest are deferred to a
later tick and make no transition yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy._arrays import distinct
from policy.admission import (
    DROP_WARM,
    EVICT,
    FETCH,
    REGENERATE,
    SPILL,
    TRANSCODE,
    WARM_COPY,
    admit,
    within_link_budgets,
)
from policy.config import PolicyConfig
from policy.plan import (
    REASON_DEMAND,
    REASON_EVICT,
    REASON_PROMOTE,
    REASON_REGENERATE,
    REASON_SHRINK,
    REASON_UPGRADE,
    REASON_VETO_EVICT,
    REASON_WARM_DOWN,
    REASON_WARM_UP,
    STATE_CODES,
    Priority,
    TransferArrays,
    TransitionArrays,
)
from policy.predict import Prediction
from policy.score import Scores, Targets
from policy.snapshot import CXL, HBM, HOST, NONE, STORAGE, EncodingTable, Snapshot
from pool.states import BlockState, check_transition

_S = {state: STATE_CODES.index(state) for state in BlockState}


def state_codes(
    table: EncodingTable,
    hbm_encoding: np.ndarray,
    fallback_level: np.ndarray,
    in_flight: np.ndarray,
    regenerable: np.ndarray,
) -> np.ndarray:
    """``pool.states.derive_state`` for the snapshot's summary of copies, vectorized."""
    has = hbm_encoding != NONE
    safe = np.where(has, hbm_encoding, 0)
    usable = has & table.usable[safe]
    full = table.full_precision[safe]
    state = np.where(regenerable, _S[BlockState.REGENERABLE], _S[BlockState.COLD])
    state = np.where(fallback_level == HOST, _S[BlockState.WARM], state)
    state = np.where(has & ~usable, _S[BlockState.HOLDING], state)
    state = np.where(in_flight != NONE, _S[BlockState.PROMOTING], state)
    state = np.where(usable & ~full, _S[BlockState.COMPACT], state)
    return np.where(usable & full, _S[BlockState.PREMIUM], state).astype(np.int8)


@dataclass(frozen=True)
class Schedule:
    transitions: TransitionArrays
    transfers: TransferArrays
    cancel_block: np.ndarray
    cancel_encoding: np.ndarray
    deferred: int


def _tier_at(snapshot: Snapshot, rows: np.ndarray, level: np.ndarray) -> np.ndarray:
    b = snapshot.blocks
    storage = int(np.flatnonzero(snapshot.tiers.level == STORAGE)[0])
    tier = np.full(len(rows), storage, dtype=np.int64)
    tier = np.where(level == HBM, b.hbm_tier[rows], tier)
    tier = np.where(level == HOST, b.host_tier[rows], tier)
    return np.where(level == CXL, b.cxl_tier[rows], tier)


_HBM_ACTIONS = (FETCH, REGENERATE, TRANSCODE, EVICT)


@dataclass
class _Actions:
    """Candidate actions, one row each (a block may have an HBM action and a fallback action)."""

    block: list[np.ndarray]
    kind: list[np.ndarray]
    src: list[np.ndarray]
    dst: list[np.ndarray]
    encoding: list[np.ndarray]
    cls: list[np.ndarray]
    deadline: list[np.ndarray]

    def add(self, kind: int, rows: np.ndarray, src, dst, encoding, cls, deadline) -> None:  # type: ignore[no-untyped-def]
        n = len(rows)
        if not n:
            return
        self.block.append(rows)
        self.kind.append(np.full(n, kind, np.int8))
        for name, value in (("src", src), ("dst", dst), ("encoding", encoding)):
            getattr(self, name).append(np.broadcast_to(np.asarray(value, np.int64), (n,)))
        self.cls.append(np.broadcast_to(np.asarray(cls, np.int8), (n,)))
        self.deadline.append(np.broadcast_to(np.asarray(deadline, np.float64), (n,)))

    def arrays(self) -> tuple[np.ndarray, ...]:
        def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        return (
            cat(self.block, np.int64),
            cat(self.kind, np.int8),
            cat(self.src, np.int64),
            cat(self.dst, np.int64),
            cat(self.encoding, np.int64),
            cat(self.cls, np.int8),
            cat(self.deadline, np.float64),
        )


def schedule(
    snapshot: Snapshot,
    scores: Scores,
    targets: Targets,
    prediction: Prediction,
    config: PolicyConfig,
) -> Schedule:
    b, enc, links, tel = snapshot.blocks, snapshot.encodings, snapshot.links, snapshot.telemetry
    cur, tgt, fly = b.hbm_encoding, targets.hbm_encoding, b.in_flight_encoding
    fb_cur, fb_tgt = b.fallback_level, targets.fallback_level
    t_next = prediction.time_to_next_use_s
    precision = np.array([e.precision.value for e in enc.encodings])
    # PERF: decide actions only for the blocks whose target differs from what they have.
    differ = np.flatnonzero((tgt != cur) | (fb_tgt != fb_cur) | (fly != NONE))
    c, t, f = cur[differ], tgt[differ], fly[differ]
    fc, ft = fb_cur[differ], fb_tgt[differ]
    safe_c, safe_t = np.where(c == NONE, 0, c), np.where(t == NONE, 0, t)
    changing = (c != NONE) & (t != NONE) & (t != c) & (f != t)
    upgrade = changing & (b.nbytes[differ, safe_t] > b.nbytes[differ, safe_c])
    upgrade &= precision[safe_c] != precision[safe_t]
    # In place only from a full-precision copy or between compressions of one precision: a
    # reduced copy re-quantized would compound its error, so it is fetched again instead.
    in_place = enc.full_precision[safe_c] | (precision[safe_c] == precision[safe_t])
    transcode = changing & ~upgrade & in_place
    refetch = changing & ~upgrade & ~in_place
    promote = (c == NONE) & (t != NONE) & (f != t)
    evict = (c != NONE) & (t == NONE)
    warm_up = (ft != fc) & ((ft == HOST) | ((ft == CXL) & (fc == STORAGE)))
    warm_down = (ft != fc) & ~warm_up
    cancel = (f != NONE) & (f != t)

    actions = _Actions([], [], [], [], [], [], [])
    # Fetches into HBM (from the fallback copy), or regeneration in place for regenerable blocks
    # whose only copy is in storage.
    fetch = differ[promote | upgrade | refetch]
    if len(fetch):
        encoding = tgt[fetch]
        size = b.nbytes[fetch, encoding]
        regenerate = b.regenerable[fetch] & (fb_cur[fetch] == STORAGE)
        move_s = (
            np.where(
                regenerate,
                size / (links.regenerate_gbps * 1e9),
                links.seconds(fb_cur[fetch], HBM, size),
            )
            + scores.static.decode_s[fetch, encoding]
        )
        new_copy = b.hbm_encoding[fetch] == NONE
        shrinking = np.isin(fetch, differ[refetch])
        cls = np.where(
            b.demand[fetch],
            Priority.DEMAND,
            np.where(
                new_copy & (t_next[fetch] < config.imminent_horizon_s),
                Priority.IMMINENT,
                Priority.PREFETCH,  # an upgrade of a usable copy is never urgent
            ),
        )
        cls = np.where(shrinking & ~b.demand[fetch], Priority.DEMOTION, cls)
        deadline = tel.now_s + t_next[fetch] - move_s - config.safety_margin_s
        for action, mask in ((FETCH, ~regenerate), (REGENERATE, regenerate)):
            rows = fetch[mask]
            src = fb_cur[rows] if action == FETCH else HBM
            actions.add(action, rows, src, HBM, encoding[mask], cls[mask], deadline[mask])
    local = differ[transcode]
    if len(local):
        making_usable = enc.usable[tgt[local]] & ~enc.usable[cur[local]]
        cls = np.where(
            making_usable & (t_next[local] < config.imminent_horizon_s),
            Priority.IMMINENT,
            np.where(making_usable, Priority.PREFETCH, Priority.DEMOTION),
        )
        deadline = np.where(
            making_usable, tel.now_s + t_next[local] - config.safety_margin_s, np.inf
        )
        actions.add(TRANSCODE, local, HBM, HBM, tgt[local], cls, deadline)
    warm = differ[warm_up]
    actions.add(WARM_COPY, warm, fb_cur[warm], fb_tgt[warm], 0, Priority.PREFETCH, np.inf)
    spill = differ[warm_down & (ft == CXL)]
    actions.add(SPILL, spill, fb_cur[spill], CXL, 0, Priority.DEMOTION, np.inf)
    evicted = differ[evict]
    actions.add(EVICT, evicted, HBM, NONE, NONE, Priority.DEMOTION, np.inf)
    dropped = differ[warm_down & (ft == STORAGE)]
    actions.add(DROP_WARM, dropped, fb_cur[dropped], NONE, NONE, Priority.DEMOTION, np.inf)
    block, kind, src, dst, encoding, cls, deadline = actions.arrays()
    on_link = kind < EVICT
    nbytes = np.where(on_link, b.nbytes[block, np.maximum(encoding, 0)], 0)

    cancelled = differ[cancel]
    resident_now = on_link & (dst == HBM) & (b.hbm_encoding[block] != NONE)
    current_bytes = b.nbytes[block, np.maximum(b.hbm_encoding[block], 0)]
    shrink = resident_now & (b.nbytes[block, np.maximum(encoding, 0)] < current_bytes)
    # An upgrade the veto requires (a floor, the quality budget) may not wait for room while the
    # block keeps serving below it: lacking room, the low-precision copy goes now.
    required_up = resident_now & ~shrink & targets.quality_bound[block]
    # Capacity first, over every candidate copy (most urgent first), so that a copy that can
    # never fit does not take a link's budget; then the link budgets over what fits.
    # A fallback copy that a fetch may read this tick stays where it is until the next tick.
    reading = np.zeros(b.count, dtype=bool)
    reading[block[kind == FETCH]] = True
    held = np.isin(kind, (DROP_WARM, SPILL)) & reading[block]  # these remove that copy
    # PERF: admission looks only at what the links could take within a few ticks (and at the
    # shrinks, which may have to make room): at a million blocks, admitting every candidate
    # copy made the schedule phase 430 ms a step instead of 270 (bench/policy_scale.py).
    linked = np.flatnonzero(on_link)
    within_reach = np.zeros(len(block), dtype=bool)
    within_reach[linked] = within_link_budgets(
        snapshot,
        src[linked],
        dst[linked],
        cls[linked],
        deadline[linked],
        nbytes[linked],
        config.model_copy(update={"tick_s": 4 * config.tick_s}),
    )
    considered = within_reach | shrink | required_up
    fits, spilled = admit(
        snapshot,
        block,
        kind,
        dst,
        encoding,
        cls,
        deadline,
        shrink & ~held,
        required_up,
        cancelled,
        held | ~(considered | (kind >= EVICT)),
        config,
    )
    issued = np.zeros(len(block), dtype=bool)
    issued[~on_link] = True  # drops need no link
    linked = np.flatnonzero(on_link & fits)
    issued[linked] = within_link_budgets(
        snapshot, src[linked], dst[linked], cls[linked], deadline[linked], nbytes[linked], config
    )
    # Required upgrades the links cannot carry this tick: the low-precision copy goes too.
    spilled |= required_up & ~issued & ~held
    deferred = int((on_link & ~issued & ~spilled).sum())
    issued |= spilled
    kind = np.where(spilled, EVICT, kind).astype(np.int8)  # fetched again, smaller, later
    on_link &= ~spilled
    issued &= ~held

    hbm_done = np.zeros(b.count, dtype=bool)
    warm_done = np.zeros(b.count, dtype=bool)
    hbm_kinds = np.isin(kind, _HBM_ACTIONS)
    hbm_done[block[issued & hbm_kinds]] = True
    warm_done[block[issued & ~hbm_kinds]] = True
    acting = distinct(np.concatenate([block[issued], cancelled]))
    was_cancelled = np.zeros(b.count, dtype=bool)
    was_cancelled[cancelled] = True
    in_flight_after = np.where(hbm_done[acting] | was_cancelled[acting], NONE, fly[acting])
    hbm_result = tgt.copy()
    hbm_result[block[spilled]] = NONE  # evicted now; the smaller copy comes on a later tick
    transitions = _transitions(
        snapshot,
        acting,
        np.where(hbm_done[acting], hbm_result[acting], cur[acting]),
        np.where(warm_done[acting], fb_tgt[acting], fb_cur[acting]),
        in_flight_after,
        block[issued],
        kind[issued],
        targets,
    )
    moving = np.flatnonzero(issued & on_link)
    moving = moving[np.lexsort((deadline[moving], cls[moving]))]
    t_rows = block[moving]
    return Schedule(
        transitions,
        TransferArrays(
            block=t_rows,
            source_level=src[moving],
            destination_level=dst[moving],
            source_tier=_tier_at(snapshot, t_rows, src[moving]),
            destination_tier=_tier_at(snapshot, t_rows, dst[moving]),
            encoding=encoding[moving],
            nbytes=nbytes[moving],
            priority=cls[moving],
            deadline_s=deadline[moving],
        ),
        cancel_block=cancelled,
        cancel_encoding=fly[cancelled],
        deferred=deferred,
    )


def _transitions(
    snapshot: Snapshot,
    rows: np.ndarray,
    hbm_after: np.ndarray,
    fallback_after: np.ndarray,
    in_flight_after: np.ndarray,
    action_block: np.ndarray,
    action_kind: np.ndarray,
    targets: Targets,
) -> TransitionArrays:
    """Transition records for ``rows``, whose copies become (``hbm_after``, ``fallback_after``,
    ``in_flight_after``) once this tick's issued actions complete."""
    b, enc = snapshot.blocks, snapshot.encodings
    cur, fb_cur = b.hbm_encoding[rows], b.fallback_level[rows]
    regen = b.regenerable[rows]
    before = state_codes(enc, cur, fb_cur, b.in_flight_encoding[rows], regen)
    after = state_codes(enc, hbm_after, fallback_after, in_flight_after, regen)

    def has(kind: int) -> np.ndarray:
        mask = np.zeros(b.count, dtype=bool)
        mask[action_block[action_kind == kind]] = True
        found: np.ndarray = mask[rows]
        return found

    warmer = (fallback_after == HOST) | ((fallback_after == CXL) & (fb_cur == STORAGE))
    reason = np.where(warmer, REASON_WARM_UP, REASON_WARM_DOWN)
    vetoed_out = targets.vetoed_out[rows]
    reason = np.where(has(EVICT), np.where(vetoed_out, REASON_VETO_EVICT, REASON_EVICT), reason)
    reason = np.where(has(TRANSCODE), REASON_SHRINK, reason)
    fetched = has(FETCH)
    safe_cur = np.where(cur == NONE, 0, cur)
    safe_after = np.where(hbm_after == NONE, 0, hbm_after)
    smaller = b.nbytes[rows, safe_after] < b.nbytes[rows, safe_cur]
    reason = np.where(
        fetched & (cur != NONE), np.where(smaller, REASON_SHRINK, REASON_UPGRADE), reason
    )
    reason = np.where(
        fetched & (cur == NONE), np.where(b.demand[rows], REASON_DEMAND, REASON_PROMOTE), reason
    )
    reason = np.where(has(REGENERATE), REASON_REGENERATE, reason)
    usable_before = (before == _S[BlockState.PREMIUM]) | (before == _S[BlockState.COMPACT])
    via = (hbm_after != NONE) & (hbm_after != cur) & ~usable_before
    # Assert the table: every state change must be allowed (through PROMOTING where it goes).
    for start, end, through in set(zip(before.tolist(), after.tolist(), via.tolist(), strict=True)):
        a, z = STATE_CODES[start], STATE_CODES[end]
        if through:
            check_transition("(step)", a, BlockState.PROMOTING)
            check_transition("(step)", BlockState.PROMOTING, z)
        else:
            check_transition("(step)", a, z)
    source_level = np.where(cur != NONE, HBM, fb_cur)
    target_level = np.where(hbm_after != NONE, HBM, fallback_after)
    return TransitionArrays(
        rows, before, after, via, source_level, cur, target_level, hbm_after, fallback_after, reason
    )
