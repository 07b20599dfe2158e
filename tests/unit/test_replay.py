"""The trace-replay simulator on hand-made traces (stalls computed by hand), trace files, the
synthetic generator's calibration, and the oracle against the peer policies."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bench.replay.policies import (
    ActivationAwarePolicy,
    LruBase,
    LruPolicy,
    LruSpecPolicy,
    OraclePolicy,
    StaticPolicy,
)
from bench.replay.presets import HARDWARE, MODELS, HardwarePreset, ModelPreset, layout
from bench.replay.quality import floors_bits, synthetic_sensitivity
from bench.replay.runner import REPLAY_POPULARITY_DECAY
from bench.replay.simulator import FULL, PREFETCH, Simulator
from bench.replay.trace import (
    SyntheticKnobs,
    Trace,
    TraceError,
    read,
    repeat_rate,
    synthesize,
)
from bench.replay.weightpool_policy import WeightpoolPolicy
from policy.config import PolicyConfig

GB = 10**9
INT8 = 2  # in the replay's encoding table (full, fp8, int8, int4, int4+zstd)
TINY = ModelPreset("tiny", 2, 0, 2, 1, 0, 8, 8, 8, 8, 8)
# A 1 GB/s link with no latency and a layer that always takes 0.5 s: stalls come out round.
SLOW = HardwarePreset("slow", 0, 1e12, 1.0, 1.0, 1.0, 0.0, 0.5)


def tiny_sim(chosen: list[list[list[int]]], hbm_experts: int = 2) -> Simulator:
    lay = layout(TINY)
    sizes = np.where(lay.kind == "expert", GB, 1)[:, None].repeat(5, axis=1).astype(np.int64)
    dense = int(sizes[lay.kind != "expert", FULL].sum())
    trace = [[np.array(layer, np.int64) for layer in step] for step in chosen]
    return Simulator(
        lay, SLOW, trace, dense + hbm_experts * GB, sizes, np.zeros(sizes.shape), np.full(5, np.inf)
    )


class DemandOnly(LruBase):
    """Dense blocks preloaded; experts fetched when needed; least recently used evicted."""

    name = "demand-only"

    def setup(self, sim: Simulator) -> None:
        for block in np.flatnonzero(sim.layout.kind != "expert").tolist():
            sim.preload(block, FULL)

    def victims(self, sim: Simulator, nbytes: int, protected: set[int]) -> list[int]:
        experts = [
            b for b in self.recent if sim.layout.kind[b] == "expert" and sim.encoding[b] >= 0
        ]
        return self._lru_victims(sim, nbytes, protected, experts)


class PrefetchNextLayer(DemandOnly):
    """Also prefetches layer 1's expert e1 while layer 0 runs (issued after layer 0's demand)."""

    def during_position(self, sim, step, position, needed) -> None:
        if position == 1:
            block = int(sim.layout.expert_block[1, 1])
            sim.fetch(self, block, FULL, PREFETCH, set(needed.tolist()) | {block})


class PrefetchEarly(DemandOnly):
    """Prefetches layer 1's expert before layer 0 routes: the demand for layer 0 must still go
    first on the link, since the prefetch has not started."""

    def before_position(self, sim, step, position) -> None:
        if position == 1:
            block = int(sim.layout.expert_block[1, 1])
            sim.fetch(self, block, FULL, PREFETCH, {block})


TRACE = [[[0], [1]], [[0], [1]]]  # two tokens: layer 0 picks expert 0, layer 1 expert 1


def test_demand_misses_stall_for_their_whole_transfer() -> None:
    # Token 0: embedding 0.5 s; layer 0 misses e0 (1 s on the link) then computes 0.5 s; layer 1
    # misses e1 (1 s) then 0.5 s; head 0.5 s. Token 1 hits everything: 4 x 0.5 s.
    result = tiny_sim(TRACE).run(DemandOnly())
    assert result.stall_s == pytest.approx(2.0)
    assert result.total_s == pytest.approx(6.0)
    assert (result.accesses, result.hits) == (12, 10)  # 6 blocks a token, 2 misses
    assert result.bytes_moved == 2 * GB


def test_a_prefetch_overlaps_with_compute() -> None:
    # Layer 1's expert leaves at 1.5 s (after layer 0's demand), lands at 2.5 s; layer 1 starts
    # at 2.0 s and waits 0.5 s instead of 1 s.
    result = tiny_sim(TRACE).run(PrefetchNextLayer())
    assert result.stall_s == pytest.approx(1.5)
    assert result.total_s == pytest.approx(5.5)


def test_a_demand_goes_ahead_of_a_prefetch_that_has_not_started() -> None:
    # Both issued at 0.5 s; the demand (layer 0's e0) takes the link first: same times as above.
    result = tiny_sim(TRACE).run(PrefetchEarly())
    assert result.stall_s == pytest.approx(1.5)
    assert result.total_s == pytest.approx(5.5)


def test_eviction_when_hbm_holds_one_expert() -> None:
    # With room for one expert, layer 1's fetch evicts e0 and token 1 misses both again.
    result = tiny_sim(TRACE, hbm_experts=1).run(DemandOnly())
    assert result.stall_s == pytest.approx(4.0)
    assert result.bytes_moved == 4 * GB


def test_prediction_recall_counts_the_experts_fetched_ahead_of_their_use() -> None:
    # Four expert reads (two tokens, two layers); only token 0's layer-1 expert was fetched
    # ahead of its read, and it was read: recall 1/4, precision 1/1.
    summary = tiny_sim(TRACE).run(PrefetchNextLayer()).summary()
    assert (summary["prediction_recall"], summary["prefetch_precision"]) == (0.25, 1.0)
    # A policy that never fetches ahead predicts nothing: no figure rather than zero.
    summary = tiny_sim(TRACE).run(DemandOnly()).summary()
    assert (summary["prediction_recall"], summary["prefetch_precision"]) == (None, None)


def _expert_misses(plan_misses: bool) -> list[tuple[int, int, int]]:
    """(token, block, encoding) of every routed expert a weightpool replay fetched on a miss,
    with full precision and INT8 the only encodings allowed (both free of drift, INT8 half the
    bytes, so INT8 is the step's choice) and HBM room for one expert."""
    sim = tiny_sim([[[0], [1]], [[1], [0]], [[0], [0]], [[1], [1]]], hbm_experts=1)
    sim.sensitivity[:] = np.inf
    sim.sensitivity[:, [FULL, INT8]] = 0.0
    sim.sizes[:, INT8] = np.maximum(sim.sizes[:, FULL] // 2, 1)
    misses = []
    fetch = sim.fetch

    def recording_fetch(policy, block, encoding, priority, protected, ahead=True):  # type: ignore[no-untyped-def]
        fetched = fetch(policy, block, encoding, priority, protected, ahead)
        if fetched and not ahead and sim.layout.is_expert[block]:
            misses.append((sim.step, block, encoding))
        return fetched

    sim.fetch = recording_fetch  # type: ignore[method-assign]
    floors = np.full(len(sim.encoding), 8, np.int16)
    sim.run(WeightpoolPolicy(PolicyConfig(tick_s=2e-3), floors, plan_misses=plan_misses))
    return misses


def test_planned_misses_come_at_the_encoding_the_step_gives_them() -> None:
    # Blocks: 2, 3 are layer 0's experts, 5, 6 layer 1's. Without a step on the miss, a block
    # comes at the last plan's demand_encoding (INT8: the drift-free encoding of half the
    # bytes); with a step on each miss, at that step's INT8 too (the misses differ at token 2
    # and 3: the extra steps' plans order the victims differently).
    assert _expert_misses(False) == [
        (0, 6, INT8),
        (1, 3, INT8),
        (1, 5, INT8),
        (2, 5, INT8),
        (3, 3, INT8),
        (3, 6, INT8),
    ]
    assert _expert_misses(True) == [
        (0, 6, INT8),
        (1, 3, INT8),
        (1, 5, INT8),
        (2, 2, INT8),
        (2, 5, INT8),
        (3, 6, INT8),
    ]


def _placement_only(sim: Simulator) -> WeightpoolPolicy:
    policy = WeightpoolPolicy(
        PolicyConfig(tick_s=2e-3), np.full(len(sim.encoding), 8, np.int16), precision=False
    )
    sim.size_of = sim.sizes.tolist()  # as Simulator.run sets it before the policy's setup
    policy.setup(sim)
    return policy


def test_the_first_plan_is_placed_before_serving_at_no_cost() -> None:
    # As every peer places its initial set (Simulator.preload): with room for three experts
    # less the 5 % headroom, the first plan (no router history yet) targets the blocks that are
    # not experts and layer 0's two experts; all are in HBM at time 0 and nothing crossed the
    # link. The run then misses only layer 1's e1 at token 0 (1 GB, 1 s).
    sim = tiny_sim(TRACE, hbm_experts=3)
    policy = _placement_only(sim)
    assert policy.plan is not None
    assert policy.plan.target_hbm_encoding.tolist() == [0, 0, 0, 0, 0, -1, -1, 0]
    assert sim.encoding.tolist() == [0, 0, 0, 0, 0, -1, -1, 0]
    assert (sim.now_s, sim.link.bytes_moved) == (0.0, 0)
    result = tiny_sim(TRACE, hbm_experts=3).run(
        WeightpoolPolicy(PolicyConfig(tick_s=2e-3), np.full(8, 8, np.int16), precision=False)
    )
    assert (result.stall_s, result.bytes_moved, result.hits) == (1.0, GB, 11)


def test_misses_evict_the_untargeted_block_whose_layer_runs_again_last() -> None:
    # Blocks: 2, 3 are layer 0's experts (position 1), 5, 6 layer 1's (position 2). Resident
    # besides the blocks that are not experts: 3 and 5, neither targeted by the last plan
    # (value density 0). While layer 1 runs (position 2) and needs 6, layer 0 comes round
    # next and layer 1 only after a whole pass: 5 goes, not 3 (the lower index, the order
    # before). A block with a higher density in the plan still stays, whatever its next use.
    sim = tiny_sim(TRACE, hbm_experts=3)
    policy = _placement_only(sim)
    assert policy.plan is not None
    sim.evict(2)
    sim.preload(5, FULL)
    assert np.flatnonzero(sim.encoding >= 0).tolist() == [0, 1, 3, 4, 5, 7]
    sim.position = 2
    assert policy.victims(sim, GB, {6}) == [5]
    sim.position = 1  # layer 0 runs and needs 2: 3 comes round after a whole pass, 5 next
    assert policy.victims(sim, GB, {2}) == [3]
    sim.position = 2
    density = policy.plan.value_density.copy()
    density[5] = 1e-9
    policy.plan = replace(policy.plan, value_density=density)
    assert policy.victims(sim, GB, {6}) == [3]


def test_trace_files_round_trip_and_bad_files_are_refused(tmp_path) -> None:
    trace = synthesize(4, 8, 2, 10, SyntheticKnobs(concurrency=3), seed=1)
    for name in ("t.arrow", "t.parquet"):
        trace.write(tmp_path / name)
        back = read(tmp_path / name)
        assert (back.num_layers, back.num_experts, back.top_k) == (4, 8, 2)
        assert np.array_equal(back.step, trace.step) and np.array_equal(back.expert, trace.expert)
    bad = Trace(np.array([0]), np.array([0]), np.array([9]), 4, 8, 2, "bad")
    bad.write(tmp_path / "bad.arrow")
    with pytest.raises(TraceError, match=r"expert values span 9..9; expected 0..7"):
        read(tmp_path / "bad.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow")
    with pytest.raises(TraceError, match="not a readable Arrow IPC or Parquet file"):
        read(tmp_path / "junk.arrow")
    with pytest.raises(TraceError, match="has 4 MoE layers of 8 experts; the model has 32 of 8"):
        trace.check_fits(32, 8)


def test_synthetic_default_is_calibrated_to_the_mixtral_repeat_rate() -> None:
    # Jiang et al. 2024 (section 5): repetition well above the 46 % of random top-2-of-8 choices.
    rates = [repeat_rate(synthesize(32, 8, 2, 300, SyntheticKnobs(), seed=s), 15) for s in range(3)]
    assert 0.55 <= float(np.mean(rates)) <= 0.68
    uniform = SyntheticKnobs(zipf_exponent=0, persistence=0, cross_layer=0)
    # Random top-2 of 8: two consecutive sets intersect with probability 1 - C(6,2)/C(8,2) = 13/28.
    assert abs(repeat_rate(synthesize(32, 8, 2, 300, uniform), 15) - 13 / 28) < 0.08


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_the_oracle_is_not_beaten_by_a_placement_only_policy(fraction) -> None:
    model, hardware = MODELS["mixtral-8x7b"], HARDWARE["h100-pcie5"]
    lay = layout(model)
    trace = synthesize(model.moe_layers, model.experts, model.top_k, 30, SyntheticKnobs(), seed=2)
    sizes = lay.nbytes[:, None].repeat(5, axis=1)
    stalls = {}
    peers = (StaticPolicy(), LruPolicy(), LruSpecPolicy(), ActivationAwarePolicy(window=8))
    placement_only = WeightpoolPolicy(
        PolicyConfig(tick_s=2e-3, popularity_decay=REPLAY_POPULARITY_DECAY),
        floors_bits(synthetic_sensitivity(lay), 2e-3),
        precision=False,
    )
    placement_only.name = "weightpool-placement"
    for policy in (*peers, placement_only, OraclePolicy()):
        sim = Simulator(
            lay,
            hardware,
            trace.chosen(),
            int(fraction * lay.nbytes.sum()),
            sizes,
            np.zeros(sizes.shape),
            np.full(5, np.inf),
        )
        stalls[policy.name] = sim.run(policy).stall_s
    assert stalls["oracle"] <= min(stalls.values()) + 1e-9, stalls


def test_routing_recorded_from_a_transformers_model_reading_text(tmp_path) -> None:
    from bench.replay.record import corpus_token_ids, record_routing

    names = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta")
    (tmp_path / "text.txt").write_text(" ".join(f"{names[i % 7]} the" for i in range(40)))
    # Ids by frequency: "the" (40 times) 1, then alpha .. epsilon (6 times), zeta, eta (5).
    assert corpus_token_ids(tmp_path / "text.txt", 6).tolist() == [2, 1, 3, 1, 4, 1]
    trace = record_routing(moe_layers=6, experts=8, top_k=2, steps=40, corpus=tmp_path)
    assert (trace.steps, trace.num_layers, trace.num_experts, trace.top_k) == (40, 6, 8, 2)
    chosen = trace.chosen()
    assert all([len(experts) for experts in step] == [2] * 6 for step in chosen)
    # Routing follows the token, down to the last layer: every "the" routes alike there, and
    # the other words do not all route as "the" does.
    last = [tuple(step[5].tolist()) for step in chosen]
    assert len(set(last[1::2])) == 1 and set(last[0::2]) - set(last[1::2])
    with pytest.raises(TraceError, match="80 words; 100 tokens were asked for"):
        corpus_token_ids(tmp_path / "text.txt", 100)


def test_popularity_drift_keeps_every_layer_a_permutation() -> None:
    from bench.replay.trace import drift_ranks

    rng = np.random.default_rng(0)
    ranks = np.tile(np.arange(6), (3, 1))
    for _ in range(50):  # many overlapping swaps on few cells
        drift_ranks(ranks, rng, 40)
        assert all(sorted(row) == list(range(6)) for row in ranks.tolist())
    a = synthesize(4, 16, 2, 30, SyntheticKnobs(drift_per_step=0.5), seed=5)
    b = synthesize(4, 16, 2, 30, SyntheticKnobs(drift_per_step=0.5), seed=5)
    assert np.array_equal(a.expert, b.expert) and np.array_equal(a.step, b.step)
