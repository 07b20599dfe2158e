"""Regenerators (pool.regen) and what the runtime keeps of them without a cluster: the
registry's checks and REGENERABLE arrays, and the memory backend's accounting of shared copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.registry import CopyEntry, CopyStatus
from actors.telemetry import TelemetryBuffer
from actors.tier_backends import MemoryBackend
from pool.blocks import BlockSpec, TensorSpec
from pool.encoding import FULL
from pool.errors import CapacityError, SpecError, UnknownBlockError
from pool.importer import StateDictSource, plan_blocks
from pool.regen import (
    RECIPES,
    LowRankDelta,
    Tied,
    adapter_state,
    check_recipe,
    merged,
    regenerate,
    tied_recipes,
)
from pool.tiers import TierKind, TierSpec
from tests.unit.test_runtime_parts import INT8, registry_with_model, tier


def test_a_merged_delta_is_the_same_bits_whatever_the_thread_count():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 80, generator=generator)
    up, down = torch.randn(96, 8, generator=generator), torch.randn(8, 80, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = merged(weight, up, down, 0.25)
        torch.set_num_threads(2)
        two = merged(weight, up, down, 0.25)
    finally:
        torch.set_num_threads(threads)
    assert one.dtype == torch.float32 and torch.equal(one, two)
    assert torch.allclose(one, weight + 0.25 * up @ down, atol=1e-5)
    # Small integers: the float64 sum is exact, so the result is the exact one.
    ints = torch.arange(12.0).reshape(3, 4)
    u, d = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    assert torch.equal(merged(ints, u, d, 2.0), ints + 2.0 * u @ d)


def test_ties_are_found_by_shared_storage_whole_blocks_only():
    embed = torch.randn(32, 8)
    bias = torch.zeros(32)
    state = {
        "embed.weight": embed,
        "head.weight": embed,  # tied: the whole block
        "proj.weight": embed,  # tied in part: its bias is its own
        "proj.bias": bias,
        "other.weight": embed.clone(),  # equal values, other storage: not tied
    }
    specs = plan_blocks(StateDictSource(state), "m")
    assert tied_recipes(specs, state) == {"m/head": Tied(source="m/embed")}
    assert regenerate(Tied(source="m/embed"), [{"weight": embed}])["weight"] is embed


def test_recipes_are_checked_against_their_blocks():
    def block(block_id: str, *tensors: tuple[str, tuple[int, ...]]) -> BlockSpec:
        return BlockSpec(block_id, tuple(TensorSpec(n, n, s, "float32") for n, s in tensors), 0)

    specs = {
        "m/a": block("m/a", ("weight", (8, 4))),
        "m/b": block("m/b", ("weight", (8, 4))),
        "m/c": block("m/c", ("weight", (4, 8))),
        "m/b.delta": block("m/b.delta", ("weight_up", (8, 2)), ("weight_down", (2, 4))),
        "m/bad.delta": block("m/bad.delta", ("weight_up", (8, 2)), ("weight_down", (3, 4))),
    }
    check_recipe(specs["m/b"], Tied(source="m/a"), specs)
    delta = LowRankDelta(base="m/a", delta="m/b.delta", tensors=("weight",), scale=1.0)
    check_recipe(specs["m/b"], delta, specs)
    with pytest.raises(SpecError, match="reads the block itself"):
        check_recipe(specs["m/b"], Tied(source="m/b"), specs)
    with pytest.raises(SpecError, match="'m/x', which is not in the pool"):
        check_recipe(specs["m/b"], Tied(source="m/x"), specs)
    with pytest.raises(SpecError, match="differ from 'm/c'"):
        check_recipe(specs["m/b"], Tied(source="m/c"), specs)
    with pytest.raises(SpecError, match=r"expected \[out, rank\] and \[rank, in\]"):
        check_recipe(specs["m/b"], delta.model_copy(update={"delta": "m/bad.delta"}), specs)
    with pytest.raises(SpecError, match="'bias' is not a matrix of the block"):
        check_recipe(specs["m/b"], delta.model_copy(update={"tensors": ("bias",)}), specs)
    with pytest.raises(ValueError, match="scale"):
        LowRankDelta(base="m/a", delta="m/b.delta", tensors=("weight",), scale=float("nan"))
    saved = {"m/b": delta, "m/h": Tied(source="m/a")}
    assert RECIPES.validate_json(RECIPES.dump_json(saved)) == saved


def test_an_adapter_becomes_deltas_for_what_it_changes_and_ties_for_the_rest():
    state = {
        "l0.q.weight": torch.randn(8, 4),
        "l0.q.bias": torch.randn(8),
        "l0.k.weight": torch.randn(8, 4),
    }
    bases = plan_blocks(StateDictSource(state), "base")
    up, down = torch.randn(8, 2), torch.randn(2, 4)
    variant, recipes = adapter_state(bases, state, "ft", {"l0.q.weight": (up, down)}, 0.5)
    assert recipes == {
        "ft/l0.q": LowRankDelta(
            base="base/l0.q", delta="ft/l0.q.delta", tensors=("weight",), scale=0.5
        ),
        "ft/l0.k": Tied(source="base/l0.k"),
    }
    assert torch.equal(variant["l0.q.weight"], merged(state["l0.q.weight"], up, down, 0.5))
    assert variant["l0.q.bias"] is state["l0.q.bias"]
    planned = {s.block_id: s for s in plan_blocks(StateDictSource(variant), "ft")}
    assert planned["ft/l0.q.delta"].names == ["weight_up", "weight_down"]
    rebuilt = regenerate(
        recipes["ft/l0.q"],
        [
            {"weight": state["l0.q.weight"], "bias": state["l0.q.bias"]},
            {"weight_up": up, "weight_down": down},
        ],
    )
    assert torch.equal(rebuilt["weight"], variant["l0.q.weight"])
    with pytest.raises(SpecError, match="not a whole tensor of the base"):
        adapter_state(bases, state, "ft", {"l0.v.weight": (up, down)}, 1.0)
    with pytest.raises(SpecError, match="making \\(8, 4\\)"):
        adapter_state(bases, state, "ft", {"l0.q.weight": (down, up)}, 1.0)


def test_the_registry_marks_regenerable_blocks_and_refuses_ties_across_tiers():
    reg = registry_with_model()
    reg.sharing.add("n1/hbm0")  # as its report says (an emulated HBM tier)
    reg.add_tier(tier("n1/hbm1", TierKind.HBM))
    other = BlockSpec("n/x", (TensorSpec("weight", "x.weight", (64, 64), "float32"),), 0)
    with pytest.raises(SpecError, match="placed for another HBM tier"):
        reg.check_recipes({"n/x": Tied(source="m/layers.0")}, [other], "n1/hbm1")
    with pytest.raises(UnknownBlockError, match="not registered"):
        reg.add_recipes({"m/nope": Tied(source="m/layers.0")})
    with pytest.raises(SpecError, match=r"cycle: m/layers\.0 -> m/layers\.1 -> m/layers\.0"):
        reg.add_recipes(
            {"m/layers.0": Tied(source="m/layers.1"), "m/layers.1": Tied(source="m/layers.0")}
        )
    assert reg.recipes == {}
    reg.add_recipes({"m/layers.2": Tied(source="m/layers.0")})
    assert reg.recipes == {"m/layers.2": Tied(source="m/layers.0")}
    telemetry = TelemetryBuffer().drain(reg.model_names(), reg.positions(), 0.0)
    # Regenerable for the policy only while its source is in its home HBM tier.
    first = reg.snapshot(telemetry).blocks.regenerable
    assert first.tolist() == [False, False, False]
    reg.add_copy(CopyEntry("m/layers.0", "n1/hbm0", FULL, CopyStatus.IN_FLIGHT, 1))
    assert reg.snapshot(telemetry).blocks.regenerable is first
    reg.add_copy(CopyEntry("m/layers.0", "n1/hbm0", FULL, CopyStatus.READY, 1))
    snap = reg.snapshot(telemetry).blocks
    second = snap.regenerable
    assert second.tolist() == [False, False, True]
    assert reg.snapshot(telemetry).blocks.regenerable is second  # the policy's cache key
    # The tied block shares its source's full copy there: it costs the tier 1 byte at full
    # precision for the policy, its own size at every other encoding; the other rows as built.
    full = reg.encodings.index(FULL)
    static = reg._current_static().blocks.nbytes
    assert snap.nbytes[2, full] == 1 and static[2, full] == 64 * 64 * 4
    others = np.ones(static.shape, bool)
    others[2, full] = False
    assert np.array_equal(snap.nbytes[others], static[others])
    assert reg.snapshot(telemetry).blocks.nbytes is snap.nbytes  # the policy's cache key
    reg.add_copy(CopyEntry("m/layers.0", "n1/hbm0", INT8, CopyStatus.READY, 2))
    assert reg.snapshot(telemetry).blocks.nbytes[2].tolist() == [
        1 if e in (FULL, INT8) else static[2, j] for j, e in enumerate(reg.encodings)
    ]
    # A copy of its own at full precision (its source landed after it) counts its size until
    # it is re-shared, and is named for the controller to re-share.
    reg.add_copy(CopyEntry("m/layers.2", "n1/hbm0", FULL, CopyStatus.READY, 3))
    assert reg.snapshot(telemetry).blocks.nbytes[2, full] == static[2, full]
    assert reg.unshared_ties == [("m/layers.2", "n1/hbm0", FULL)]
    # Sharing the source's copy of epoch 1 (as the tier's alias records it): shared.
    own = reg.copy("m/layers.2", "n1/hbm0", FULL)
    own.shared_of, own.shared_epoch = "m/layers.0", 1
    assert reg.snapshot(telemetry).blocks.nbytes[2, full] == 1 and reg.unshared_ties == []
    # The source's copy dropped (the share kept its buffer) and copied in again (epoch 4):
    # the share holds the old buffer, its own bytes now, until re-shared.
    reg.add_copy(CopyEntry("m/layers.0", "n1/hbm0", FULL, CopyStatus.READY, 4))
    assert reg.snapshot(telemetry).blocks.nbytes[2, full] == static[2, full]
    assert reg.unshared_ties == [("m/layers.2", "n1/hbm0", FULL)]
    assert reg.holds_own("m/layers.2", "n1/hbm0", FULL)
    # Arriving (in flight) or while it has a host copy: its own size.
    own.shared_epoch, own.status = 4, CopyStatus.IN_FLIGHT
    assert reg.snapshot(telemetry).blocks.nbytes[2, full] == static[2, full]
    own.status = CopyStatus.READY
    reg.add_copy(CopyEntry("m/layers.2", "n1/host", FULL, CopyStatus.READY, 5))
    assert reg.snapshot(telemetry).blocks.nbytes[2, full] == static[2, full]
    reg.remove_copy("m/layers.2", "n1/host", FULL)
    assert reg.snapshot(telemetry).blocks.nbytes[2, full] == 1 and reg.unshared_ties == []
    # A tier that does not share copies (a device HBM tier): the block's own size.
    reg.sharing.discard("n1/hbm0")
    assert reg.snapshot(telemetry).blocks.nbytes[2, full] == static[2, full]
    assert not reg.holds_own("m/layers.2", "n1/hbm0", FULL)
    reg.sharing.add("n1/hbm0")
    reg.remove_copy("m/layers.0", "n1/hbm0", FULL)
    reg.remove_copy("m/layers.0", "n1/hbm0", INT8)
    assert reg.snapshot(telemetry).blocks.nbytes is static  # nothing shared: the built array


def test_a_shared_copy_counts_once_until_its_last_holder_drops_it():
    spec = TierSpec(tier_id="n1/hbm0", kind=TierKind.HBM, capacity_bytes=250, node="n1", device=0)
    backend = MemoryBackend(spec)
    backend.reserve("m/a", FULL, 100)
    backend.commit("ref-a", CopyEntry("m/a", "n1/hbm0", FULL, CopyStatus.READY, 1, 100, "ca"))
    alias = CopyEntry("m/b", "n1/hbm0", FULL, CopyStatus.READY, 2, shared_of="m/a")
    assert backend.alias("m/a", alias) == "ref-a"
    assert (alias.nbytes, alias.checksum, backend.used_bytes()) == (100, "ca", 100)
    chained = CopyEntry("m/c", "n1/hbm0", FULL, CopyStatus.READY, 3, shared_of="m/b")
    backend.alias("m/b", chained)
    assert chained.shared_of == "m/a"  # the block whose id labels the shared bytes
    assert alias.shared_epoch == chained.shared_epoch == 1  # the epoch of m/a's copy
    with pytest.raises(CapacityError, match="exists already"):
        backend.alias("m/a", alias)
    with pytest.raises(UnknownBlockError, match="no copy 'm/z'"):
        backend.alias("m/z", CopyEntry("m/y", "n1/hbm0", FULL, CopyStatus.READY, 4))
    # Replacing a shared copy frees nothing: 100 held + 160 > 250.
    with pytest.raises(CapacityError, match="needs 160 bytes"):
        backend.reserve("m/a", FULL, 160)
    assert backend.drop("m/a", FULL) == 0 and backend.used_bytes() == 100
    assert backend.drop("m/b", FULL) == 0 and backend.used_bytes() == 100
    assert backend.drop("m/c", FULL) == 100 and backend.used_bytes() == 0
    assert backend.inventory() == []
