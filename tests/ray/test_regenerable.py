"""REGENERABLE blocks in the runtime: tied weights share their source's HBM copy, and a model
fine-tuned by a low-rank adapter is rebuilt in HBM from its base's copy and the factors.

The models are small transformers models built from a config (no download); every check reads
the rebuilt blocks back through leases and compares them, bit for bit, with the tensors the
driver holds.
"""

from __future__ import annotations

import pytest
import ray
import torch

from actors.client import PoolClient
from pool.errors import SpecError, UnknownBlockError
from pool.importer import StateDictSource, plan_blocks
from pool.regen import LowRankDelta, Tied, adapter_state, merged
from tests.ray.helpers import make_pool, settled, teardown, wait_until

MB = 1 << 20
NAMESPACE = "t-regen"


def tiny_model(seed: int, tie: bool) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def regen(ray_cluster, tmp_path_factory):
    pool = make_pool(NAMESPACE, tmp_path_factory.mktemp("regen"), hbm_bytes_per_device=16 * MB)
    yield pool
    teardown(NAMESPACE)


def blocks_of(pool, model: str) -> list[str]:
    return [s.block_id for s in ray.get(pool.controller.model_blocks.remote(model))[1]]


def all_premium(pool, model: str) -> bool:
    states = [ray.get(pool.controller.block_state.remote(b)) for b in blocks_of(pool, model)]
    return set(states) == {"premium"} and settled(pool)


def test_tied_weights_share_one_copy_in_hbm(regen):
    model = tiny_model(seed=0, tie=True)
    state = model.state_dict()
    home = regen.load_state_dict(state, "tied")
    wait_until(lambda: all_premium(regen, "tied"), what="every block premium")

    with PoolClient(namespace=NAMESPACE) as client:
        head = client.get("tied/lm_head")["weight"]
        embed = client.get("tied/model.embed_tokens")["weight"]
    assert torch.equal(head, state["lm_head.weight"])
    assert torch.equal(head, embed)
    shared = [
        r.detail
        for r in ray.get(regen.controller.audit.remote("execute", "tied/lm_head"))
        if "regenerated" in r.detail
    ]
    assert shared == [f"regenerated on {home}@full: shares tied/model.embed_tokens's copy"]
    # The tier counts the shared buffer once: every block's bytes but the head's.
    specs = ray.get(regen.controller.model_blocks.remote("tied"))[1]
    distinct = sum(s.full_nbytes for s in specs if s.block_id != "tied/lm_head")
    report = ray.get(regen.tier(home).report.remote())
    assert report.used_bytes == distinct
    assert ray.get(regen.controller.consistency.remote()) == []


def test_an_adapter_is_rebuilt_from_its_base_in_hbm(regen):
    base = tiny_model(seed=1, tie=False)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    home = regen.load_state_dict(state, "base")
    wait_until(lambda: all_premium(regen, "base"), what="the base premium")
    used_base = ray.get(regen.tier(home).report.remote()).used_bytes

    generator = torch.Generator().manual_seed(2)
    q, down = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
    factors = {
        q: (torch.randn(64, 4, generator=generator), torch.randn(4, 64, generator=generator)),
        down: (torch.randn(64, 2, generator=generator), torch.randn(2, 128, generator=generator)),
    }
    before = regen.status()["counters"]
    assert regen.load_adapter("base", state, "ft", factors, scale=0.5) == home
    wait_until(lambda: all_premium(regen, "ft"), what="the adapted model premium")

    rebuilt = [b for b in blocks_of(regen, "ft") if not b.endswith(".delta")]
    counters = regen.status()["counters"]
    assert counters["regenerations"] - before.get("regenerations", 0) == len(rebuilt)
    for block in rebuilt:  # no block of the variant was copied into HBM: each was rebuilt there
        moved = ray.get(regen.controller.audit.remote("execute", block))
        assert not [r for r in moved if f"-> {home}@" in r.detail], block

    with PoolClient(namespace=NAMESPACE) as client:
        got_q = client.get("ft/model.layers.0.self_attn.q_proj")["weight"]
        got_k = client.get("ft/model.layers.0.self_attn.k_proj")["weight"]
        got_down = client.get("ft/model.layers.1.mlp.down_proj")["weight"]
    assert torch.equal(got_q, merged(state[q], *factors[q], 0.5))
    assert torch.allclose(got_q, state[q] + 0.5 * factors[q][0] @ factors[q][1], atol=1e-5)
    assert torch.equal(got_down, merged(state[down], *factors[down], 0.5))
    assert torch.equal(got_k, state["model.layers.0.self_attn.k_proj.weight"])
    # In HBM the variant costs its two merged blocks and the factors, not a second model.
    added = ray.get(regen.tier(home).report.remote()).used_bytes - used_base
    specs = {s.block_id: s for s in ray.get(regen.controller.model_blocks.remote("ft"))[1]}
    adapted = ("ft/model.layers.0.self_attn.q_proj", "ft/model.layers.1.mlp.down_proj")
    merged_and_factors = sum(
        specs[b].full_nbytes + specs[b + ".delta"].full_nbytes for b in adapted
    )
    assert added == merged_and_factors
    assert ray.get(regen.controller.consistency.remote()) == []


def test_an_adapter_on_a_tied_block_is_merged_into_the_shared_copy(regen):
    wait_until(lambda: all_premium(regen, "tied"), what="the tied model premium")
    state = tiny_model(seed=0, tie=True).state_dict()
    generator = torch.Generator().manual_seed(4)
    up, down = torch.randn(512, 2, generator=generator), torch.randn(2, 64, generator=generator)
    regen.load_adapter("tied", state, "tied-ft", {"lm_head.weight": (up, down)}, scale=0.25)
    wait_until(lambda: all_premium(regen, "tied-ft"), what="the adapted model premium")
    # Its base, tied/lm_head, is a shared copy labelled as tied/model.embed_tokens's bytes.
    records = ray.get(regen.controller.audit.remote("execute", "tied-ft/lm_head"))
    assert [r.detail.split(": ", 1)[1] for r in records if "regenerated" in r.detail] == [
        "tied/lm_head + delta"
    ]
    with PoolClient(namespace=NAMESPACE) as client:
        head = client.get("tied-ft/lm_head")["weight"]
    assert torch.equal(head, merged(state["lm_head.weight"], up, down, 0.25))


def untied_resident(pool, seed: int, model: str) -> tuple[str, int, torch.Tensor]:
    """Load a tied model with ``tie=False`` (its head a copy of its own: two copies of one
    tensor) and wait until it is resident; its home tier, that tier's used bytes, the head."""
    state = tiny_model(seed=seed, tie=True).state_dict()
    home = pool.load_state_dict(state, model, tie=False)
    wait_until(lambda: all_premium(pool, model), what="every block premium")
    return home, ray.get(pool.tier(home).report.remote()).used_bytes, state["lm_head.weight"]


def test_a_tie_declared_later_replaces_the_own_copy_by_the_shared_one(regen):
    home, used, head = untied_resident(regen, 5, "late")
    before = regen.status()["counters"].get("reshared", 0)
    assert regen.add_regenerators({"late/lm_head": Tied(source="late/model.embed_tokens")}) == 1
    wait_until(  # by the next step
        lambda: regen.status()["counters"].get("reshared", 0) == before + 1, what="re-shared"
    )
    wait_until(lambda: all_premium(regen, "late"), what="premium again")
    copies = [c for c in ray.get(regen.controller.copies.remote("late/lm_head")) if c[0] == home]
    assert [c[1:3] for c in copies] == [("full", "ready")]
    assert ray.get(regen.tier(home).report.remote()).used_bytes == used - head.numel() * 4
    with PoolClient(namespace=NAMESPACE) as client:
        assert torch.equal(client.get("late/lm_head")["weight"], head)
    assert ray.get(regen.controller.consistency.remote()) == []


def test_a_tie_declared_while_the_own_copy_is_leased_is_shared_once_the_lease_ends(regen):
    home, used, head = untied_resident(regen, 8, "held")
    before = regen.status()["counters"].get("reshared", 0)
    before_deferred = regen.status()["counters"].get("drops_deferred_leased", 0)
    with PoolClient(namespace=NAMESPACE) as client:
        assert torch.equal(client.acquire(["held/lm_head"])["held/lm_head"]["weight"], head)
        regen.add_regenerators({"held/lm_head": Tied(source="held/model.embed_tokens")})
        steps = regen.status()["counters"]["steps"]
        wait_until(lambda: regen.status()["counters"]["steps"] > steps + 5, what="steps")
        assert ray.get(regen.tier(home).report.remote()).used_bytes == used  # still its own
        # A plain lease is waited for, never recalled, and the drop is not even tried.
        counters = regen.status()["counters"]
        assert counters.get("drops_deferred_leased", 0) == before_deferred
        client.release()
    # A later step re-shares it: the tier holds the head's bytes once.
    shared = used - head.numel() * 4
    wait_until(
        lambda: ray.get(regen.tier(home).report.remote()).used_bytes == shared,
        what="the copy re-shared after the release",
    )
    assert regen.status()["counters"]["reshared"] == before + 1
    with PoolClient(namespace=NAMESPACE) as client:
        assert torch.equal(client.get("held/lm_head")["weight"], head)
    wait_until(lambda: settled(regen), what="settled")
    assert ray.get(regen.controller.consistency.remote()) == []


def test_a_kept_lease_on_the_own_copy_is_recalled_for_the_re_share(regen):
    home, used, head = untied_resident(regen, 9, "kept")
    before = regen.status()["counters"]
    with PoolClient(namespace=NAMESPACE) as client:
        assert torch.equal(client.get("kept/lm_head", recallable=True)["weight"], head)
        assert regen.add_regenerators({"kept/lm_head": Tied(source="kept/model.embed_tokens")})
        # Kept leases are renewed until recalled: the step recalls this one, the client lets
        # it go (no use in progress), and the copy is re-shared.
        wait_until(lambda: client.lease_of("kept/lm_head") is None, what="the lease recalled")
        wait_until(
            lambda: ray.get(regen.tier(home).report.remote()).used_bytes == used - head.numel() * 4,
            what="the copy re-shared",
        )
        assert torch.equal(client.get("kept/lm_head")["weight"], head)
    after = regen.status()["counters"]
    assert after["reshared"] == before.get("reshared", 0) + 1
    assert after.get("drops_deferred_leased", 0) == before.get("drops_deferred_leased", 0)
    leases = ray.get(regen.controller.audit.remote("lease", "kept/lm_head"))
    assert any("recalled" in r.detail for r in leases)
    wait_until(lambda: settled(regen), what="settled")
    assert ray.get(regen.controller.consistency.remote()) == []


def test_a_rebuild_that_does_not_match_the_checksum_is_copied_instead(regen):
    # A recipe naming the wrong factors (those of "ft", not the ones merged into this model's
    # stored block) rebuilds other bytes: the tier refuses them by the block's checksum and
    # the block is copied from its own bytes, bit-exact.
    state = {k: v.detach().clone() for k, v in tiny_model(seed=1, tie=False).state_dict().items()}
    q = "model.layers.0.self_attn.q_proj.weight"
    generator = torch.Generator().manual_seed(6)
    up, down = torch.randn(64, 4, generator=generator), torch.randn(4, 64, generator=generator)
    bases = plan_blocks(StateDictSource(state), "base")
    merged_state, _ = adapter_state(bases, state, "wrong", {q: (up, down)}, 0.5)
    recipe = LowRankDelta(
        base="base/model.layers.0.self_attn.q_proj",
        delta="ft/model.layers.0.self_attn.q_proj.delta",
        tensors=("weight",),
        scale=0.5,
    )
    block = "wrong/model.layers.0.self_attn.q_proj"
    before = regen.status()["counters"].get("regenerate_fallbacks", 0)
    home = ray.get(regen.controller.home_of_model.remote("base"))
    regen.load_state_dict(merged_state, "wrong", home, regenerators={block: recipe}, tie=False)
    wait_until(lambda: all_premium(regen, "wrong"), what="the model premium")
    assert regen.status()["counters"]["regenerate_fallbacks"] == before + 1
    faults = [r.detail for r in ray.get(regen.controller.audit.remote("fault", block))]
    assert len(faults) == 1 and "CorruptBlockError" in faults[0], faults
    with PoolClient(namespace=NAMESPACE) as client:
        assert torch.equal(client.get(block)["weight"], merged_state[q])
    assert ray.get(regen.controller.consistency.remote()) == []


def test_bad_regenerators_are_refused_before_anything_is_imported(regen):
    model = tiny_model(seed=3, tie=False)
    state = model.state_dict()
    with pytest.raises(UnknownBlockError, match="not registered"):
        regen.load_state_dict(state, "bad", regenerators={"bad/nope": Tied(source="bad/lm_head")})
    with pytest.raises(SpecError, match="differ"):
        regen.load_state_dict(
            state, "bad", regenerators={"bad/lm_head": Tied(source="bad/model.norm")}
        )
    with pytest.raises(SpecError, match="ranks 2 and 3"):
        regen.load_adapter(
            "base",
            state,
            "bad",
            {"model.layers.0.self_attn.q_proj.weight": (torch.ones(64, 2), torch.ones(3, 64))},
        )
    assert "bad" not in regen.status()["models"]
    assert not [s for s in ray.get(regen.storage().specs.remote()) if s.model == "bad"]


def test_a_restarted_controller_keeps_the_regenerators_and_the_shared_copies(regen):
    wait_until(lambda: settled(regen), what="settled")
    q = "ft/model.layers.0.self_attn.q_proj"
    before = {b: sorted(ray.get(regen.controller.copies.remote(b))) for b in ("tied/lm_head", q)}
    ray.kill(regen.controller, no_restart=False)

    def answers() -> bool:
        try:
            ray.get(regen.controller.status.remote(), timeout=2)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    wait_until(answers, what="the controller back")
    assert ray.get(regen.controller.regenerator.remote("tied/lm_head")) == Tied(
        source="tied/model.embed_tokens"
    )
    recipe = ray.get(regen.controller.regenerator.remote(q))
    assert (recipe.kind, recipe.base, recipe.delta, recipe.scale) == (
        "low-rank-delta",
        "base/model.layers.0.self_attn.q_proj",
        q + ".delta",
        0.5,
    )
    after = {b: sorted(ray.get(regen.controller.copies.remote(b))) for b in before}
    assert after == before  # adopted from the inventories, the shared copy included
    with PoolClient(namespace=NAMESPACE) as client:
        head = client.get("tied/lm_head")["weight"]
    assert torch.equal(head, tiny_model(seed=0, tie=True).state_dict()["lm_head.weight"])
    assert ray.get(regen.controller.consistency.remote()) == []


def test_the_policy_counts_a_shared_copy_once(ray_cluster, tmp_path):
    # An HBM tier with room for every block's bytes but the tied head's (less the policy's
    # headroom): counting the shared buffer once, the policy places the whole model there.
    state = tiny_model(seed=7, tie=True).state_dict()
    specs = plan_blocks(StateDictSource(state), "fit")
    total = sum(s.full_nbytes for s in specs)
    head = next(s.full_nbytes for s in specs if s.block_id == "fit/lm_head")
    headroom = 0.05  # PolicyConfig's hbm_headroom_fraction
    capacity = int((total - head) / (1 - headroom)) + 4096
    assert capacity * (1 - headroom) < total  # the head's own copy would not fit
    pool = make_pool("t-regen-fit", tmp_path, hbm_bytes_per_device=capacity)
    try:
        home = pool.load_state_dict(state, "fit")
        wait_until(lambda: all_premium(pool, "fit"), what="every block premium")
        assert ray.get(pool.tier(home).report.remote()).used_bytes == total - head
        with PoolClient(namespace="t-regen-fit") as client:
            assert torch.equal(client.get("fit/lm_head")["weight"], state["lm_head.weight"])
        assert ray.get(pool.controller.consistency.remote()) == []
    finally:
        teardown("t-regen-fit")
