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

from policy._schedule_chain import tick
from policy.config import PolicyConfig
from policy.plan import STATE_CODES, TransferArrays, TransitionArrays
from policy.predict import Prediction
from policy.score import Scores, Targets
from policy.snapshot import Snapshot
from pool.states import ALLOWED_TRANSITIONS, BlockState, check_transition

# State codes in the order ``policy._admit_kernels.state_code`` takes them.
_CODES = np.array(
    [
        STATE_CODES.index(state)
        for state in (
            BlockState.REGENERABLE,
            BlockState.COLD,
            BlockState.WARM,
            BlockState.HOLDING,
            BlockState.PROMOTING,
            BlockState.COMPACT,
            BlockState.PREMIUM,
        )
    ],
    np.int64,
)


def _allowed_changes() -> np.ndarray:
    """``[S, S, 2]``: whether a change from state code ``a`` to ``z`` (through PROMOTING when
    the last index is 1) passes ``pool.states.check_transition``."""

    def allowed(a: BlockState, z: BlockState) -> bool:
        return a is z or (a, z) in ALLOWED_TRANSITIONS

    table = np.zeros((len(STATE_CODES), len(STATE_CODES), 2), dtype=bool)
    for i, a in enumerate(STATE_CODES):
        for j, z in enumerate(STATE_CODES):
            table[i, j, 0] = allowed(a, z)
            table[i, j, 1] = allowed(a, BlockState.PROMOTING) and allowed(BlockState.PROMOTING, z)
    return table


# PERF: the step's state changes checked against this table in the compiled tick; only where it
# refuses one do they go through ``check_transition`` (to raise its error). One call per
# distinct change before: 14.7 -> 5.4 us for 11 changes (timeit), then none.
_ALLOWED_CHANGES = _allowed_changes()


@dataclass(frozen=True)
class Schedule:
    transitions: TransitionArrays
    transfers: TransferArrays
    cancel_block: np.ndarray
    cancel_encoding: np.ndarray
    deferred: int
    # From the same pass over the blocks (PERF: see ``policy._action_kernels.classify``):
    hbm_bytes: np.ndarray  # [T] bytes of the target HBM copies per tier
    warm_bytes: np.ndarray  # [T] bytes of the target host and CXL copies per tier


def schedule(
    snapshot: Snapshot,
    scores: Scores,
    targets: Targets,
    prediction: Prediction,
    config: PolicyConfig,
) -> Schedule:
    """Transfers and transitions for this tick (see the module docstring), and the sums of the
    targets' placement.

    The candidate actions that can matter this tick come first, in the order of the full action
    table (``policy._action_kernels``): every drop, every shrink or upgrade of a resident copy,
    and every transfer its link could carry within a few ticks. PERF: the full table (a row per
    differing block: a million at a million blocks) is never built; the transfers that could be
    within reach are kept per link in a small heap as the blocks stream past (``stream``), and
    only the kept actions are described. Then capacity, over the candidate copies (most urgent
    first), so that a copy that can never fit does not take a link's budget; then the link
    budgets over what fits; then what the tick does. PERF: all in one compiled call
    (``policy._schedule_chain.tick``; there were a dozen numpy passes and seven concatenations
    before the kernels, 100 ms a step at a million blocks).
    """
    b, enc, links, tel = snapshot.blocks, snapshot.encodings, snapshot.links, snapshot.telemetry
    static = scores.static
    # PERF: admission looks only at what the links could take within a few ticks (and at the
    # shrinks, which may have to make room): at a million blocks, admitting every candidate
    # copy made the schedule phase 430 ms a step instead of 270.
    reach_s = 4 * config.tick_s
    records, transfers, deferred, cancelled, cancel_encoding, hbm_bytes, warm_bytes, refused = tick(
        b.hbm_encoding,
        targets.hbm_encoding,
        b.in_flight_encoding,
        b.fallback_level,
        targets.fallback_level,
        b.nbytes,
        b.regenerable,
        enc.precision_index,  # PERF: cached on the table (a list search per encoding a step)
        enc.full_precision,
        b.hbm_tier,
        b.host_tier,
        b.cxl_tier,
        len(snapshot.tiers.tier_ids),
        static.storage_tier,
        prediction.time_to_next_use_s,
        static.decode_rate,
        b.demand,
        targets.quality_bound,
        targets.vetoed_out,
        enc.usable,
        scores.usable_bytes.astype(np.float64),
        links.gbps,
        links.latency_s,
        tel.link_busy_fraction,
        float(links.regenerate_gbps),
        float(tel.now_s),
        config.tick_s,
        reach_s,
        config.imminent_horizon_s,
        config.safety_margin_s,
        config.demotion_link_busy_fraction,
        config.max_transitions_per_step,
        _CODES,
        _ALLOWED_CHANGES,
    )
    if refused:  # a state change the table refuses: check_transition raises its error
        _check_changes(records[-1])
    return Schedule(
        TransitionArrays(*records[:-1]),
        TransferArrays(*transfers),
        cancel_block=cancelled,
        cancel_encoding=cancel_encoding,
        deferred=deferred,
        hbm_bytes=hbm_bytes,
        warm_bytes=warm_bytes,
    )


def _check_changes(seen: np.ndarray) -> None:
    """Every state change ``seen`` (``[S, S, 2]``) must be allowed, through PROMOTING where it
    goes: ``check_transition`` raises for the first that is not."""
    for start, end, through in zip(*seen.nonzero(), strict=True):
        a, z = STATE_CODES[start], STATE_CODES[end]
        if through:
            check_transition("(step)", a, BlockState.PROMOTING)
            check_transition("(step)", BlockState.PROMOTING, z)
        else:
            check_transition("(step)", a, z)
