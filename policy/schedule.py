"""Schedule: turn the vetoed targets into transfers and transitions for this tick.

Actions per block, from its current copies to its target:

- promote (no HBM copy yet) or upgrade (a bigger encoding): a transfer from the block's fallback
  level into HBM, with a deadline of next use less transfer, decode and a safety margin;
- change of compression only (HOLDING to usable, or back), or a smaller encoding: a local
  transcode in HBM (the HBM->HBM link);
- evict: drop the HBM copy (the fallback copy exists by definition, no transfer);
- a faster fallback (storage or CXL to host, storage to CXL): a copy into the warm tier; a slower
  one: drop the copy, or spill host to CXL;
- a copy in flight toward HBM that the target no longer wants: cancelled.

Priority classes: DEMAND (a lease waits) before IMMINENT (next use within the imminent horizon)
before PREFETCH before DEMOTION. Each link gets ``gbps * tick_s`` bytes per tick, less what
transfers in flight already use; transfers are issued in class, then deadline, order while they
fit their link's budget (the first on an idle link always goes, however large). Demotions wait while
their link is busier than ``demotion_link_busy_fraction``. The rest are deferred to a later tick.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy._arrays import distinct
from policy.config import PolicyConfig
from policy.plan import (
    REASON_DEMAND,
    REASON_EVICT,
    REASON_PROMOTE,
    REASON_SHRINK,
    REASON_UPGRADE,
    REASON_WARM_DOWN,
    REASON_WARM_UP,
    STATE_CODES,
    Priority,
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
class TransitionArrays:
    block: np.ndarray
    from_state: np.ndarray
    to_state: np.ndarray
    via_promoting: np.ndarray
    source_level: np.ndarray
    source_encoding: np.ndarray
    target_level: np.ndarray
    target_encoding: np.ndarray
    fallback_level: np.ndarray
    reason: np.ndarray


@dataclass(frozen=True)
class Schedule:
    transitions: TransitionArrays
    transfer_block: np.ndarray
    transfer_source_level: np.ndarray
    transfer_destination_level: np.ndarray
    transfer_source_tier: np.ndarray
    transfer_destination_tier: np.ndarray
    transfer_encoding: np.ndarray
    transfer_nbytes: np.ndarray
    transfer_priority: np.ndarray
    transfer_deadline_s: np.ndarray
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
    same_precision = precision[safe_c] == precision[safe_t]
    bigger = b.nbytes[differ, safe_t] > b.nbytes[differ, safe_c]
    warm_up_d = (ft != fc) & ((ft == HOST) | ((ft == CXL) & (fc == STORAGE)))
    warm_down_d = (ft != fc) & ~warm_up_d

    def full_mask(subset: np.ndarray) -> np.ndarray:
        mask = np.zeros(b.count, dtype=bool)
        mask[differ[subset]] = True
        return mask

    promote = full_mask((c == NONE) & (t != NONE) & (f != t))
    upgrade = full_mask(changing & bigger & ~same_precision)
    transcode = full_mask(changing & ~(bigger & ~same_precision))
    evict = full_mask((c != NONE) & (t == NONE))
    warm_up = full_mask(warm_up_d)
    warm_down = full_mask(warm_down_d)
    spill = full_mask(warm_down_d & (ft == CXL))

    # Candidate transfers: (rows, source level, destination level, encoding, class, deadline).
    parts = []
    fetch = np.flatnonzero(promote | upgrade)
    if len(fetch):
        size = b.nbytes[fetch, tgt[fetch]]
        move_s = links.seconds(fb_cur[fetch], HBM, size) + scores.static.decode_s[fetch, tgt[fetch]]
        cls = np.where(
            b.demand[fetch],
            Priority.DEMAND,
            np.where(
                t_next[fetch] < config.imminent_horizon_s, Priority.IMMINENT, Priority.PREFETCH
            ),
        )
        deadline = tel.now_s + t_next[fetch] - move_s - config.safety_margin_s
        parts.append((fetch, fb_cur[fetch], np.full(len(fetch), HBM), tgt[fetch], cls, deadline))
    local = np.flatnonzero(transcode)
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
        parts.append(
            (local, np.full(len(local), HBM), np.full(len(local), HBM), tgt[local], cls, deadline)
        )
    warm = np.flatnonzero(warm_up | spill)
    if len(warm):
        cls = np.where(warm_up[warm], Priority.PREFETCH, Priority.DEMOTION)
        parts.append(
            (
                warm,
                fb_cur[warm],
                fb_tgt[warm],
                np.zeros(len(warm), np.int64),
                cls,
                np.full(len(warm), np.inf),
            )
        )

    if parts:
        rows = np.concatenate([p[0] for p in parts])
        src = np.concatenate([p[1] for p in parts]).astype(np.int64)
        dst = np.concatenate([p[2] for p in parts]).astype(np.int64)
        encoding = np.concatenate([p[3] for p in parts]).astype(np.int64)
        cls = np.concatenate([p[4] for p in parts]).astype(np.int8)
        deadline = np.concatenate([p[5] for p in parts]).astype(np.float64)
    else:
        rows = src = dst = encoding = np.zeros(0, np.int64)
        cls = np.zeros(0, np.int8)
        deadline = np.zeros(0)
    nbytes = b.nbytes[rows, encoding]
    issued = _within_link_budgets(snapshot, src, dst, cls, deadline, nbytes, config)

    # Drops need no link. Everything issued becomes a transition, most urgent first, up to the cap.
    drops = np.flatnonzero(evict | (warm_down & ~spill))
    drop_cls = np.full(len(drops), Priority.DEMOTION, np.int8)
    act_rows = np.concatenate([rows[issued], drops])
    act_cls = np.concatenate([cls[issued], drop_cls])
    act_deadline = np.concatenate([deadline[issued], np.full(len(drops), np.inf)])
    act_hbm = np.concatenate([dst[issued] == HBM, evict[drops]])
    order = np.lexsort((act_deadline, act_cls))[: config.max_transitions_per_step]
    keep_transfer = order[order < issued.sum()]  # already in class, then deadline, order
    transfer_index = np.flatnonzero(issued)[keep_transfer]
    deferred = len(rows) - len(transfer_index)
    # Only what is issued now changes a block's state now: its HBM action, its fallback action.
    hbm_done = np.zeros(b.count, dtype=bool)
    warm_done = np.zeros(b.count, dtype=bool)
    hbm_done[act_rows[order][act_hbm[order]]] = True
    warm_done[act_rows[order][~act_hbm[order]]] = True
    acting = distinct(act_rows[order])
    hbm_after = np.where(hbm_done[acting], tgt[acting], cur[acting])
    fallback_after = np.where(warm_done[acting], fb_tgt[acting], fb_cur[acting])

    transitions = _transitions(
        snapshot, acting, hbm_after, fallback_after, promote, upgrade, transcode, evict, b.demand
    )
    cancel = differ[(f != NONE) & (f != t)]
    t_rows = rows[transfer_index]
    return Schedule(
        transitions,
        transfer_block=t_rows,
        transfer_source_level=src[transfer_index],
        transfer_destination_level=dst[transfer_index],
        transfer_source_tier=_tier_at(snapshot, t_rows, src[transfer_index]),
        transfer_destination_tier=_tier_at(snapshot, t_rows, dst[transfer_index]),
        transfer_encoding=encoding[transfer_index],
        transfer_nbytes=nbytes[transfer_index],
        transfer_priority=cls[transfer_index],
        transfer_deadline_s=deadline[transfer_index],
        cancel_block=cancel,
        cancel_encoding=fly[cancel],
        deferred=int(deferred),
    )


def _within_link_budgets(
    snapshot: Snapshot,
    src: np.ndarray,
    dst: np.ndarray,
    cls: np.ndarray,
    deadline: np.ndarray,
    nbytes: np.ndarray,
    config: PolicyConfig,
) -> np.ndarray:
    """Mask of the transfers issued this tick under each link's byte budget."""
    links, tel = snapshot.links, snapshot.telemetry
    issued = np.zeros(len(src), dtype=bool)
    if not len(src):
        return issued
    link = src * 4 + dst
    # Class first, then deadline: one sortable key (deadlines are seconds from now, clipped).
    key = cls * 1e12 + np.clip(deadline - tel.now_s, -1e11, 1e11)
    for code in distinct(link).tolist():
        mine = np.flatnonzero(link == code)
        capacity = links.gbps.reshape(-1)[code] * 1e9 * config.tick_s
        busy = tel.link_busy_fraction.reshape(-1)[code]
        if capacity <= 0:
            continue
        # PERF: a link takes a few transfers per tick; sort only as many as could fit.
        could_fit = int(min(len(mine), capacity // max(int(nbytes[mine].min()), 1) + 2))
        if could_fit < len(mine):
            head = np.argpartition(key[mine], could_fit - 1)[:could_fit]
            mine = mine[head]
        mine = mine[np.argsort(key[mine], kind="stable")]
        size = nbytes[mine].astype(np.float64)
        before = np.cumsum(size) - size
        used = busy + before / capacity
        used_after = busy + (before + size) / capacity
        limit = np.where(cls[mine] == Priority.DEMOTION, config.demotion_link_busy_fraction, 1.0)
        first_on_idle_link = (before == 0) & (busy < limit)
        issued[mine] = ((used < limit) & (used_after <= limit)) | first_on_idle_link
    return issued


def _transitions(
    snapshot: Snapshot,
    rows: np.ndarray,
    tgt: np.ndarray,
    fb_tgt: np.ndarray,
    promote: np.ndarray,
    upgrade: np.ndarray,
    transcode: np.ndarray,
    evict: np.ndarray,
    demand: np.ndarray,
) -> TransitionArrays:
    """Transition records for ``rows``, whose HBM encoding and fallback level become ``tgt`` and
    ``fb_tgt`` once this tick's actions complete."""
    b, enc = snapshot.blocks, snapshot.encodings
    cur = b.hbm_encoding[rows]
    fb_cur = b.fallback_level[rows]
    none = np.full(len(rows), NONE)
    before = state_codes(enc, cur, fb_cur, b.in_flight_encoding[rows], b.regenerable[rows])
    after = state_codes(enc, tgt, fb_tgt, none, b.regenerable[rows])
    warmer = (fb_tgt == HOST) | ((fb_tgt == CXL) & (fb_cur == STORAGE))
    reason = np.where(warmer, REASON_WARM_UP, REASON_WARM_DOWN)
    moved = tgt != cur
    reason = np.where(moved & evict[rows], REASON_EVICT, reason)
    reason = np.where(moved & transcode[rows], REASON_SHRINK, reason)
    reason = np.where(moved & upgrade[rows], REASON_UPGRADE, reason)
    promoted = moved & promote[rows]
    reason = np.where(promoted, np.where(demand[rows], REASON_DEMAND, REASON_PROMOTE), reason)
    usable_before = (before == _S[BlockState.PREMIUM]) | (before == _S[BlockState.COMPACT])
    in_hbm_after = tgt != NONE
    via = in_hbm_after & ~usable_before & (before != after)
    # Assert the table: every state change must be allowed (through PROMOTING where it goes).
    pairs = set(zip(before.tolist(), after.tolist(), via.tolist(), strict=True))
    for start, end, through in pairs:
        a, z = STATE_CODES[start], STATE_CODES[end]
        if through:
            check_transition("(step)", a, BlockState.PROMOTING)
            check_transition("(step)", BlockState.PROMOTING, z)
        else:
            check_transition("(step)", a, z)
    source_level = np.where(cur != NONE, HBM, fb_cur)
    target_level = np.where(tgt != NONE, HBM, fb_tgt)
    return TransitionArrays(
        rows, before, after, via, source_level, cur, target_level, tgt, fb_tgt, reason
    )
