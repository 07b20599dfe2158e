"""The control step: ``step(snapshot, state, config) -> (plan, state)``.

Phases, each timed: observe (fold telemetry into the state), predict, score and choose targets,
veto (then spend spare HBM on precision), schedule. Pure with respect to the world: it reads the
snapshot, decides, and returns a plan; executing the plan is the placement actor's job. The input
state is consumed (its arrays are updated in place and returned as the new state).
"""

from __future__ import annotations

import math
import time

from policy._memory import keep_freed_memory
from policy.config import PolicyConfig
from policy.demand import DemandEncodings, DemandRule
from policy.plan import Metrics, Plan
from policy.predict import observe, predict
from policy.quality_feedback import budget_config, remember_plan
from policy.schedule import schedule
from policy.score import score_and_choose
from policy.snapshot import Snapshot
from policy.state import PolicyState
from policy.static import static_for
from policy.veto import veto_and_refine


def step(snapshot: Snapshot, state: PolicyState, config: PolicyConfig) -> tuple[Plan, PolicyState]:
    keep_freed_memory()  # PERF: policy._memory; a million blocks: 268, 286 -> 256, 254 ms
    clock = time.perf_counter
    t0 = clock()
    # PERF: what predict needs of the snapshot first, while the interpreter's data is warm,
    # not after observe's kernel evicted it (neither reads what observe folds in). policy_ab
    # against f356594 both ways (its bias, a null run's, taken out): observe + predict about
    # 5 us less at 16,384 blocks, 2 us at 1,000.
    static = state.static = static_for(snapshot, state.static, state.shape)
    config = budget_config(snapshot, state, static, config)  # the veto's budget, see there
    quality = observe(snapshot, state, config)
    t1 = clock()
    prediction = predict(snapshot, state, static, config)
    t2 = clock()
    scores, targets = score_and_choose(snapshot, prediction, static, config)
    t3 = clock()
    # The veto, then HBM left spent on precision; its cost and quality cost are the final
    # targets' (the upgrades' at full precision).
    vetoed, _ = veto_and_refine(snapshot, scores, targets, prediction, config)
    blocks, tiers = snapshot.blocks, snapshot.tiers
    hbm = targets.hbm_encoding
    cost = vetoed.cost
    quality_cost = vetoed.quality_cost
    remember_plan(state, static, cost, hbm, config)
    excess = quality_cost - config.quality_budget
    # demand_encoding (policy.plan.Plan): the budget rule's price where it fixed blocks (what
    # it left unspent is the overshoot of its last fix, shared by every demand before the next
    # step); where it fixed none, the budget's headroom.
    price = vetoed.quality_price
    binding = math.isfinite(price)
    demand = DemandRule(
        headroom=0.0 if binding else max(-excess, 0.0),
        price=price if binding else 0.0,
        exhausted=excess > 1e-15,  # the budget exhausted, with the veto's tolerance
    )
    t4 = clock()
    # PERF: the placement's sums come from the schedule's first pass.
    scheduled = schedule(snapshot, scores, targets, prediction, config)
    t5 = clock()
    phase_ms = {
        "observe": (t1 - t0) * 1e3,
        "predict": (t2 - t1) * 1e3,
        "score": (t3 - t2) * 1e3,
        "veto": (t4 - t3) * 1e3,
        "schedule": (t5 - t4) * 1e3,
    }

    rejected = vetoed.rejections.arrays()
    hbm_bytes, warm_bytes = scheduled.hbm_bytes.tolist(), scheduled.warm_bytes.tolist()
    metrics = Metrics(
        quality_cost=quality_cost,
        quality_budget=config.quality_budget,
        hbm_bytes_by_tier={tiers.tier_ids[t]: hbm_bytes[t] for t in static.hbm_tiers},
        warm_bytes_by_tier={tiers.tier_ids[t]: warm_bytes[t] for t in static.warm_tiers},
        prediction_precision=quality.precision,
        prediction_recall=quality.recall,
        deferred_transfers=scheduled.deferred,
        phase_ms=phase_ms,
    )
    plan = Plan(
        now_s=snapshot.telemetry.now_s,
        block_ids=blocks.block_ids,
        encodings=snapshot.encodings.encodings,
        tier_ids=tiers.tier_ids,
        target_hbm_encoding=hbm,
        target_fallback_level=targets.fallback_level,
        transition_rows=scheduled.transitions,
        transfer_rows=scheduled.transfers,
        rejection_block=rejected[0],
        rejection_rule=rejected[1],
        rejection_proposed=rejected[2],
        rejection_fallback=rejected[3],
        rejection_value=rejected[4],
        rejection_limit=rejected[5],
        cancel_block=scheduled.cancel_block,
        cancel_encoding=scheduled.cancel_encoding,
        use_probability=prediction.use_probability,
        time_to_next_use_s=prediction.time_to_next_use_s,
        value_density=targets.chosen_density,
        # PERF: computed when asked (policy.demand), not for every block every step.
        demand=DemandEncodings(
            demand,
            hbm,
            scores.preferred,
            blocks.sensitivity,
            static.allowed,
            static.budget_fallback,
            blocks.nbytes,
        ),
        metrics=metrics,
    )
    return plan, state
