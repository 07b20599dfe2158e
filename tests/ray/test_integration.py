"""Real models whose weights the pool serves (actors/integration.py), on the real Ray cluster.

One pool, three HBM tiers of 96 MiB (one per node). MiniLM (87 MiB) is loaded three times, each
placed for its own tier: on the first alone (it fits: outputs bit-exact); on the second beside a
24 MiB tenant that holds leases on all its blocks (about 67 MiB left: the model keeps its leases
until the controller recalls them to make room, and streams through the rest); on the third calibrated, beside a 48 MiB tenant (demotion is forced; the veto keeps the
embeddings within the cosine bound). A small Qwen2-MoE model with random weights shows that only
the experts its router chose are leased, and that its experts run on the leased tensors in place
(transformers' eager loop) or on a workspace (grouped_mm), with the same logits.
"""

from __future__ import annotations

import pytest
import ray
import torch

from actors.client import PoolClient
from actors.integration import IntegrationError, manage
from policy.config import PolicyConfig
from pool.calibration import BlockCalibration, CalibrationResult, CalibrationTimings, calibrate
from pool.encoding import Encoding, Precision, precision_allowed
from pool.errors import UnknownBlockError
from pool.importer import SafetensorsSource, plan_blocks
from pool.reference_model import CALIBRATION_TEXTS, cosines, embed, load_minilm
from pool.tiers import TierKind
from tests.ray.helpers import make_pool, settled, teardown, wait_until

MB = 1 << 20
NAMESPACE = "t-integration"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "How do I reset my password if I no longer have access to my email?",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "She forgot her umbrella and got soaked walking home from the station.",
]
MINILM_LAYERS = 8  # embeddings (-1), six encoder layers, the pooler (6)


def tenant_weights(mebibytes: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {f"t.{i}.weight": torch.randn(512, 512, generator=generator) for i in range(mebibytes)}


QUALITY_BUDGET = 2e-4  # predicted drift (mean 1 - cosine): the veto's bound
# Held out from calibration: the guardrail is checked on texts the sensitivities never saw.
GUARD_TEXTS = [
    "The library extended its opening hours during the exam period.",
    "A strong earthquake struck the coast early on Sunday morning.",
    "Can you recommend a good book about the history of mathematics?",
    "The airline cancelled dozens of flights because of the strike.",
    "Volunteers planted two thousand trees along the river bank.",
    "Our team will migrate the database to the new servers next month.",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Forwards on one thread: with the cluster's processes on the same two cores, torch's
    default threads oversubscribe them (calibration took 60 s instead of 3.4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool(ray_cluster, tmp_path_factory):
    pool = make_pool(
        NAMESPACE,
        tmp_path_factory.mktemp("integration"),
        hbm_bytes_per_device=96 * MB,
        policy=PolicyConfig(tick_s=0.05, quality_budget=QUALITY_BUDGET),
    )
    yield pool
    teardown(NAMESPACE)


def hbm_tiers(pool) -> list[str]:
    return [t.tier_id for t in pool.tiers if t.kind is TierKind.HBM]


def all_premium(pool, model: str) -> bool:
    blocks = ray.get(pool.controller.model_blocks.remote(model))[1]
    states = {ray.get(pool.controller.block_state.remote(s.block_id)) for s in blocks}
    return states == {"premium"} and settled(pool)


@pytest.fixture(scope="module")
def reference(minilm_path):
    model, tokenizer = load_minilm(minilm_path)
    return tokenizer, embed(model, tokenizer, TEXTS), model


def fresh_minilm(minilm_path):
    """An unmanaged MiniLM to hand to manage() (its weights are replaced by the pool's)."""
    model, _ = load_minilm(minilm_path)
    return model


def counters(pool) -> dict[str, int]:
    return pool.status()["counters"]


def test_resident_model_is_bit_exact_and_runs_on_cache_hits(pool, minilm_path, reference):
    tokenizer, want, _ = reference
    home = hbm_tiers(pool)[0]
    pool.load_checkpoint(minilm_path, "minilm", home=home)
    wait_until(lambda: all_premium(pool, "minilm"), what="minilm resident")
    model = fresh_minilm(minilm_path)
    before = counters(pool)
    with PoolClient(namespace=NAMESPACE, device=home) as client:
        managed = manage(model, client, "minilm")
        assert len(managed.dense) == 54 and not managed.experts
        # One hook pair per layer: embeddings, six encoder layers, the pooler.
        assert [g.path for g in managed.groups] == [
            "embeddings",
            *(f"encoder.layer.{i}" for i in range(6)),
            "pooler.dense",
        ]
        # The model keeps no copy: every managed tensor is a placeholder; what stays local is
        # the token-type-ids buffer the checkpoint does not hold.
        assert managed.local_bytes == 512 * 8
        assert all(p.is_meta for p in model.parameters())
        got = embed(model, tokenizer, TEXTS)
        assert torch.equal(got, want)
        assert all(p.is_meta for p in model.parameters())  # dropped after use
        grants = counters(pool)["lease_grants_resident"]
        assert grants - before.get("lease_grants_resident", 0) == 54
        assert torch.equal(embed(model, tokenizer, TEXTS), want)
        assert counters(pool)["lease_grants_resident"] == grants  # all hits: no remote call
        managed.remove()
    client.flush()
    wait_until(
        lambda: (
            counters(pool).get("telemetry_layer_times", 0)
            == before.get("telemetry_layer_times", 0) + 2 * MINILM_LAYERS
        ),
        what="layer times reported",
    )


def test_model_larger_than_its_hbm_streams_through_leases(pool, minilm_path, reference):
    tokenizer, want, _ = reference
    home = hbm_tiers(pool)[1]
    pool.load_state_dict(tenant_weights(24), "tenant24", home=home)
    with PoolClient(namespace=NAMESPACE, device=home) as tenant:
        tenant.acquire([f"tenant24/t.{i}" for i in range(24)])  # pinned while the test runs
        pool.load_checkpoint(minilm_path, "minilm-s", home=home)
        wait_until(lambda: settled(pool), what="placed")
        before = counters(pool)
        model = fresh_minilm(minilm_path)
        with PoolClient(namespace=NAMESPACE, device=home) as client:
            managed = manage(model, client, "minilm-s", granularity="block")
            assert len(managed.groups) == 54  # one hook pair per block
            for _ in range(2):
                assert torch.equal(embed(model, tokenizer, TEXTS), want)
                # 87 MiB cannot stay leased beside the tenant: kept leases were recalled.
                assert len(managed.leased_blocks()) < 54
        after = counters(pool)
    assert after["lease_misses"] > before.get("lease_misses", 0)  # blocks had to be promoted
    assert after["lease_recalls"] > before.get("lease_recalls", 0)
    assert after.get("lease_violations", 0) == 0
    report = pool.status()["tiers"][home]
    assert report.used_bytes <= report.capacity_bytes
    wait_until(
        lambda: (
            counters(pool).get("telemetry_layer_times", 0)
            >= before.get("telemetry_layer_times", 0) + 2 * MINILM_LAYERS
        ),
        what="layer times reported",
    )


def test_guardrail_keeps_the_embeddings_within_the_bound_under_demotion(pool, minilm_path):
    model, tokenizer = load_minilm(minilm_path)
    want = embed(model, tokenizer, GUARD_TEXTS)
    calibration = calibrate(
        model,
        tokenizer,
        plan_blocks(SafetensorsSource(minilm_path), "minilm"),
        texts=CALIBRATION_TEXTS[:6],
    )
    home = hbm_tiers(pool)[2]
    pool.load_state_dict(tenant_weights(48), "tenant48", home=home)
    with PoolClient(namespace=NAMESPACE, device=home) as tenant:
        tenant.acquire([f"tenant48/t.{i}" for i in range(48)])
        # Calibrated under another name: matched by module path.
        pool.load_checkpoint(minilm_path, "minilm-c", home=home, calibration=calibration)
        specs = {s.block_id: s for s in ray.get(pool.controller.model_blocks.remote("minilm-c"))[1]}
        floors = {b.block_id.replace("minilm/", "minilm-c/"): b.floor for b in calibration.blocks}
        assert {b: s.floor for b, s in specs.items()} == floors
        managed_model = fresh_minilm(minilm_path)
        with PoolClient(namespace=NAMESPACE, device=home) as client:
            managed = manage(managed_model, client, "minilm-c")
            for _ in range(3):
                got = embed(managed_model, tokenizer, GUARD_TEXTS)
                assert float(cosines(got, want).min()) >= 0.999
            used = dict(managed.leased_encoding)
    # 87 MiB in the 43 MiB left: blocks were leased at reduced precisions, none below its floor.
    reduced = {b for b, e in used.items() if e != Encoding.parse("full")}
    assert "minilm-c/embeddings.word_embeddings" in reduced  # 47 MiB at full: it cannot fit
    assert all(precision_allowed(used[b].precision, specs[b].floor) for b in used)
    status = pool.status()
    assert status["quality_cost"] <= QUALITY_BUDGET
    # The drift the calibration predicts for the encodings the forwards actually used.
    predicted = sum(specs[b].sensitivity[e.precision] for b, e in used.items())
    assert predicted <= QUALITY_BUDGET


def tiny_moe(seed: int = 0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return Qwen2MoeForCausalLM(config).eval().requires_grad_(False)


def test_moe_leases_only_the_routed_experts(pool):
    reference = tiny_moe()
    pool.load_state_dict(reference.state_dict(), "moe", home=hbm_tiers(pool)[0])
    wait_until(lambda: all_premium(pool, "moe"), what="moe resident")
    routed: dict[int, set[int]] = {}

    def recorder(layer):
        def hook(_module, _args, output):
            routed.setdefault(layer, set()).update(output[2].flatten().tolist())

        return hook

    for i, layer in enumerate(reference.model.layers):
        layer.mlp.gate.register_forward_hook(recorder(i))
    tokens = torch.tensor([[5, 17, 99]])
    with torch.inference_mode():
        want = reference(tokens).logits
    before = counters(pool)
    model = tiny_moe(seed=1)  # other random weights: the pool's replace them
    with PoolClient(namespace=NAMESPACE) as client:
        managed = manage(model, client, "moe")
        assert set(managed.experts) == {f"model.layers.{i}.mlp.experts" for i in range(2)}
        # By default the experts run transformers' eager loop on the leased tensors in place.
        assert model.config._experts_implementation == "eager"
        with torch.inference_mode():
            got = model(tokens).logits
        assert torch.equal(got, want)
        workspaces = {id(f.workspace): f.workspace for f in managed.experts.values()}
        assert all(not w.tensors for w in workspaces.values())  # no copy was made
        # An implementation that needs every expert in one tensor runs on the workspace.
        model.set_experts_implementation("grouped_mm")
        with torch.inference_mode():
            assert torch.equal(model(tokens).logits, want)
        assert all(w.tensors for w in workspaces.values())
        leased_experts = {b for b in managed.leased_blocks() if "/expert." in b}
        expected = {
            f"moe/model.layers.{layer}.mlp.experts/expert.{e}"
            for layer, experts in routed.items()
            for e in experts
        }
        assert leased_experts == expected
        assert len(expected) < 2 * 16  # the router chose a strict subset
        assert all(p.is_meta for p in model.parameters())
        for layer in range(2):
            path = f"model.layers.{layer}.mlp.experts"
            assert set(managed.experts[path].last_route) == routed[layer]
        managed.remove()
    wait_until(
        lambda: counters(pool).get("telemetry_routes", 0) == before.get("telemetry_routes", 0) + 4,
        what="routes reported",
    )


def test_a_model_that_does_not_match_is_refused_unchanged(pool, minilm_path):
    wait_until(lambda: "minilm" in pool.status()["models"], what="minilm")
    model = fresh_minilm(minilm_path)
    model.pooler.dense = torch.nn.Linear(384, 10)  # every other block would bind
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with PoolClient(namespace=NAMESPACE) as client:
        with pytest.raises(
            IntegrationError,
            match=r"block 'minilm/pooler\.dense', tensor 'bias' \(model tensor "
            r"'pooler\.dense\.bias'\): shape \(10,\) in the model; expected \(384,\)",
        ):
            manage(model, client, "minilm")
        with pytest.raises(Exception, match="model 'no-such-model' is not registered"):
            manage(model, client, "no-such-model")
        assert client.cache == {}  # nothing leased
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_a_calibration_of_another_checkpoint_is_refused_before_import(pool, minilm_path):
    other = CalibrationResult(
        model="other",
        blocks=(
            BlockCalibration("other/no.such.module", 0, {Precision.INT8: 1e-6}, Precision.INT8),
        ),
        precisions=(Precision.INT8,),
        threshold=1e-4,
        texts=("a",),
        timings=CalibrationTimings(0.0, 0.0, 0.0, 0, 0.0),
    )
    before = {s.block_id for s in ray.get(pool.storage().specs.remote())}
    with pytest.raises(UnknownBlockError, match=r"names blocks \['other/no\.such\.module'\]"):
        pool.load_checkpoint(minilm_path, "minilm-x", calibration=other)
    assert {s.block_id for s in ray.get(pool.storage().specs.remote())} == before
    assert "minilm-x" not in pool.status()["models"]
