"""The runtime's pure parts, without Ray: tier layout from node resources, the lease table's
fencing, and the registry's snapshot and reconciliation."""

from __future__ import annotations

import pytest

from actors.config import PoolConfig
from actors.leases import LeaseTable
from actors.registry import CopyEntry, CopyStatus, Registry, TierInfo
from actors.topology import NodeInfo, plan_tiers
from policy.snapshot import HOST, NONE, STORAGE
from pool.blocks import BlockSpec, TensorSpec
from pool.encoding import FULL, Encoding
from pool.errors import DuplicateBlockError, UnknownBlockError
from pool.tiers import TierKind

INT8 = Encoding.parse("int8")


def test_tiers_follow_node_resources():
    nodes = [
        NodeInfo("a" * 16, {"weightpool_host": 1, "weightpool_storage": 1}, is_driver=True),
        NodeInfo("b" * 16, {"weightpool_host": 1, "GPU": 2}, is_driver=False),
        NodeInfo("c" * 16, {"weightpool_cxl": 1}, is_driver=False),
    ]
    tiers = plan_tiers(nodes, PoolConfig(cxl_bytes=1 << 30))
    got = {(t.tier_id, t.kind, t.spec.emulated) for t in tiers}
    assert got == {
        ("aaaaaaaa/hbm0", TierKind.HBM, True),
        ("aaaaaaaa/host", TierKind.HOST, False),
        ("aaaaaaaa/storage", TierKind.STORAGE, False),
        ("bbbbbbbb/hbm0", TierKind.HBM, False),
        ("bbbbbbbb/hbm1", TierKind.HBM, False),
        ("bbbbbbbb/host", TierKind.HOST, False),
        ("cccccccc/hbm0", TierKind.HBM, True),
        ("cccccccc/cxl", TierKind.CXL, True),
    }


def lease_table() -> LeaseTable:
    return LeaseTable(ttl_s=10.0, generation="gen1")


def test_a_lease_renews_only_as_itself_and_not_after_release_or_expiry():
    table = lease_table()
    a = table.grant("A", "m/x", "t/hbm0", FULL, epoch=5, now_s=0.0)
    b = table.grant("B", "m/y", "t/hbm0", FULL, epoch=6, now_s=0.0)
    assert a.lease_id == "gen1-1" and b.lease_id == "gen1-2"
    assert table.renew(a, now_s=5.0).expires_s == 15.0
    impostor = type(a)(a.lease_id, "A", "m/y", "t/hbm0", FULL, 6, a.expires_s)
    assert table.renew(impostor, now_s=5.0) is None
    assert table.release([impostor]) == 0
    assert table.release([b]) == 1
    assert table.renew(b, now_s=5.0) is None
    assert table.renew(a, now_s=16.0) is None  # expired
    assert table.leases == {}
    assert table.issued_here("gen1-9") and not table.issued_here("gen0-1")


def test_leases_pin_their_copy_and_are_revoked_with_it():
    table = lease_table()
    table.grant("A", "m/x", "t/hbm0", FULL, epoch=5, now_s=0.0)
    table.grant("A", "m/y", "u/hbm0", INT8, epoch=6, now_s=0.0)
    assert table.pins("m/x", "t/hbm0", FULL, now_s=1.0)
    assert not table.pins("m/x", "t/hbm0", INT8, now_s=1.0)
    assert table.leased_blocks(now_s=1.0) == {"m/x", "m/y"}
    assert [x.block_id for x in table.revoke_tier("u/hbm0")] == ["m/y"]
    assert [x.block_id for x in table.revoke_copy("m/x", "t/hbm0", FULL)] == ["m/x"]
    assert table.leases == {}


def tier(tier_id: str, kind: TierKind, capacity: int | None = 1 << 30) -> TierInfo:
    from pool.tiers import TierSpec

    device = 0 if kind is TierKind.HBM else None
    spec = TierSpec(tier_id=tier_id, kind=kind, capacity_bytes=capacity, node="n1", device=device)
    return TierInfo(spec, "n1")


def registry_with_model() -> Registry:
    reg = Registry()
    for info in (
        tier("n1/hbm0", TierKind.HBM),
        tier("n1/host", TierKind.HOST),
        tier("n1/storage", TierKind.STORAGE, None),
    ):
        reg.add_tier(info)
    specs = [
        BlockSpec(
            f"m/layers.{i}",
            (TensorSpec("weight", f"layers.{i}.weight", (64, 64), "float32"),),
            layer=i,
        )
        for i in range(3)
    ]
    reg.add_model("m", specs, "n1/hbm0")
    return reg


def entry(block: str, tier_id: str, enc: Encoding, epoch: int, status=CopyStatus.READY):
    return CopyEntry(block, tier_id, enc, status, epoch, nbytes=16384, checksum=f"c{epoch}")


def test_bad_registrations_are_refused():
    reg = registry_with_model()
    with pytest.raises(UnknownBlockError, match="not an HBM tier"):
        reg.add_model("n", [], "n1/host")
    with pytest.raises(DuplicateBlockError, match="'m'"):
        reg.add_model("m", [], "n1/hbm0")


def test_snapshot_reads_copies_as_levels_and_keeps_static_arrays():
    reg = registry_with_model()
    reg.add_copy(entry("m/layers.0", "n1/hbm0", INT8, 3))
    reg.add_copy(entry("m/layers.0", "n1/host", FULL, 4))
    reg.add_copy(entry("m/layers.1", "n1/hbm0", FULL, 5, CopyStatus.IN_FLIGHT))
    first = reg.snapshot(reg_telemetry(reg), leased=["m/layers.2"], demand=["m/layers.1"])
    b = first.blocks
    assert b.hbm_encoding.tolist() == [reg.encodings.index(INT8), NONE, NONE]
    assert b.in_flight_encoding.tolist() == [NONE, 0, NONE]
    assert b.fallback_level.tolist() == [HOST, STORAGE, STORAGE]
    assert b.leased.tolist() == [False, False, True]
    assert b.demand.tolist() == [False, True, False]
    second = reg.snapshot(reg_telemetry(reg))
    assert second.blocks.nbytes is b.nbytes  # the policy's static cache is keyed by identity
    reg.measured("m/layers.0", Encoding.parse("int4+zstd"), 1234)  # not the estimate
    assert reg.snapshot(reg_telemetry(reg)).blocks.nbytes is not b.nbytes
    # A dead host tier holds no warm copies: the blocks fall back to storage.
    assert reg.set_dead("n1/host", True) and not reg.set_dead("n1/host", True)
    after = reg.snapshot(reg_telemetry(reg)).blocks
    assert after.host_tier.tolist() == [NONE] * 3
    assert after.fallback_level.tolist() == [STORAGE] * 3


def reg_telemetry(reg: Registry):
    from actors.telemetry import TelemetryBuffer

    return TelemetryBuffer().drain(reg.model_names(), reg.positions(), now_s=1.0)


def test_reconcile_forgets_lost_copies_keeps_in_flight_and_adopts_the_rest():
    reg = registry_with_model()
    reg.add_copy(entry("m/layers.0", "n1/host", FULL, 3))
    reg.add_copy(entry("m/layers.1", "n1/host", FULL, 4, CopyStatus.IN_FLIGHT))
    held = [entry("m/layers.2", "n1/host", FULL, 9), entry("other/x", "n1/host", FULL, 10)]
    forgotten, adopted = reg.reconcile("n1/host", held, now_s=7.0)
    assert [(c.block_id, c.epoch) for c in forgotten] == [("m/layers.0", 3)]
    assert adopted == 1
    assert reg.copy("m/layers.1", "n1/host", FULL).status is CopyStatus.IN_FLIGHT
    adopted_copy = reg.copy("m/layers.2", "n1/host", FULL)
    assert adopted_copy.created_s == 7.0 and reg.checksums[("m/layers.2", FULL)] == "c9"
    assert reg.new_epoch() == 10  # above every epoch seen
