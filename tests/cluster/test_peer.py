"""Peer copies between emulated devices on different nodes, through a ray.util.collective group
(gloo on CPU), on the session's real 3-node cluster."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.client import PoolClient
from actors.peer import Member, PeerError, PeerGroup
from actors.tier import TierActor
from pool.codecs import EncodedBlock, EncodedTensor, Part
from pool.encoding import FULL, Precision
from pool.errors import CorruptBlockError
from pool.tiers import TierKind, TierSpec
from tests.ray.helpers import make_pool, reads_back_on, settled, teardown, wait_until

MB = 1 << 20
LAYERS = 4


def weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {f"layers.{i}.weight": torch.randn(256, 512, generator=gen) for i in range(LAYERS)}


@pytest.fixture(scope="module")
def peered(ray_cluster, tmp_path_factory):
    pool = make_pool("t-peer", tmp_path_factory.mktemp("peer"), hbm_bytes_per_device=16 * MB)
    workers = sorted(n.node_id for n in ray_cluster.worker_nodes)
    hbm = {t.node_id: t.tier_id for t in pool.tiers if t.kind is TierKind.HBM}
    old = hbm[workers[0]]
    assert pool.load_state_dict(weights(), "m", home=old) == old
    yield pool, hbm, old
    teardown("t-peer")


BLOCKS = [f"m/layers.{i}" for i in range(LAYERS)]


def drain_while_leased(pool, hbm: dict[str, str], tier: str) -> tuple[str, dict[str, int]]:
    """Lease every block's copy on ``tier``, drain it, wait until every block also has a ready
    copy on one other device; that device and the counters then (leases released after)."""
    with PoolClient(namespace="t-peer", device=tier) as holder:
        for block in BLOCKS:
            holder.get(block)  # leased: the drain must leave these copies until released
        ray.get(pool.controller.drain.remote(tier))

        def elsewhere() -> set[str]:
            found = set()
            for block in BLOCKS:
                copies = ray.get(pool.controller.copies.remote(block))
                ready = {c[0] for c in copies if c[2] == "ready" and c[0] in hbm.values()}
                found.add(frozenset(ready - {tier}))
            return set().union(*found) if len(found) == 1 else set()

        wait_until(lambda: len(elsewhere()) == 1, what="every block on the new device")
        (successor,) = elsewhere()
        return successor, pool.status()["counters"]


def read_back(pool, successor: str) -> None:
    want = weights()
    expected = {block: want[f"layers.{i}.weight"] for i, block in enumerate(BLOCKS)}
    reads_back_on(pool, "t-peer", successor, expected)


def test_a_drained_device_fills_its_successor_by_peer_copies(peered):
    """Leased copies on a drained device cannot be dropped; the model's new device is filled from
    them by peer copies through the gloo group, each verified, and reads back bit-exact."""
    pool, hbm, old = peered
    wait_until(
        lambda: pool.status()["states"] == {"premium": LAYERS} and settled(pool), what="premium"
    )
    successor, counters = drain_while_leased(pool, hbm, old)
    assert counters.get("peer_copies", 0) == LAYERS
    assert counters.get("peer_fallbacks", 0) == 0
    assert counters["bytes:hbm->peer"] == LAYERS * 256 * 512 * 4
    read_back(pool, successor)


def test_a_member_gone_from_the_group_costs_one_fallback(peered):
    """A device that left the group (as a restarted actor has) fails the next peer copy, which
    is made by Ray's object transfer instead; the group forms again for the copies after it."""
    pool, hbm, old = peered
    copies = ray.get(pool.controller.copies.remote(BLOCKS[0]))
    (current,) = ({c[0] for c in copies} - {old}) & set(hbm.values())
    ray.get(pool.tier(current).peer_leave.remote())
    successor, counters = drain_while_leased(pool, hbm, current)
    assert successor not in (old, current)
    assert counters["peer_fallbacks"] == 1
    assert counters["peer_copies"] == 2 * LAYERS - 1
    faults = ray.get(pool.controller.audit.remote("fault", None, 10_000))
    assert len([r for r in faults if "by object transfer instead" in r.detail]) == 1
    read_back(pool, successor)


def test_the_group_refuses_bad_bytes_and_an_unformable_group_is_reported(ray_cluster):
    """Standalone HBM tiers on two nodes: a copy is bit-exact, a wrong checksum is refused with
    nothing stored (the group still works), a missing copy is a PeerError, and a group with a
    dead member is a PeerError at once, not retried until its members change."""
    nodes = [ray_cluster.head_node.node_id, *sorted(n.node_id for n in ray_cluster.worker_nodes)]
    actor = ray.remote(TierActor)

    def hbm(i: int):
        spec = TierSpec(
            tier_id=f"p{i}/hbm0",
            kind=TierKind.HBM,
            capacity_bytes=8 * MB,
            node=nodes[i],
            device=0,
            emulated=True,
        )
        strategy = NodeAffinitySchedulingStrategy(nodes[i], soft=False)
        return actor.options(max_concurrency=4, num_cpus=0, scheduling_strategy=strategy).remote(
            spec
        )

    a, b = hbm(0), hbm(2)
    data = np.random.default_rng(3).integers(0, 255, 3 * MB, dtype=np.uint8)
    scale = np.arange(64, dtype=np.uint8)
    block = EncodedBlock(
        "x/w",
        FULL,
        (
            EncodedTensor(
                "w",
                Precision.FULL,
                (Part("values", "uint8", (3 * MB,), data), Part("scale", "uint8", (64,), scale)),
            ),
        ),
    )
    entry, _ = ray.get(a.keep.remote("x/w", FULL, block, 1, ""))
    members = [Member("p0/hbm0", "i", a), Member("p2/hbm0", "i", b)]
    group = PeerGroup("t-peer-direct", timeout_s=30)
    try:
        with pytest.raises(CorruptBlockError):
            group.copy(members, "p0/hbm0", "p2/hbm0", "x/w", FULL, 2, "0" * 32)
        assert ray.get(b.inventory.remote()) == []
        got_entry, handle = group.copy(
            members, "p0/hbm0", "p2/hbm0", "x/w", FULL, 3, entry.checksum
        )
        assert group.backend == "GLOO"
        assert got_entry.checksum == entry.checksum and got_entry.epoch == 3
        got = ray.get(handle[0])
        parts = got.tensors[0].parts
        assert np.array_equal(parts[0].data, data) and np.array_equal(parts[1].data, scale)
        assert [c.block_id for c in ray.get(b.inventory.remote())] == ["x/w"]
        with pytest.raises(PeerError):
            group.copy(members, "p0/hbm0", "p2/hbm0", "x/missing", FULL, 4, "")
        ray.kill(b)
        dead = [members[0], Member("p2/hbm0", "restarted", b)]
        quick = PeerGroup("t-peer-dead", timeout_s=3)
        with pytest.raises(PeerError, match="did not form"):
            quick.copy(dead, "p0/hbm0", "p2/hbm0", "x/w", FULL, 5, entry.checksum)
        with pytest.raises(PeerError, match="did not form"):  # at once: the same members
            quick.copy(dead, "p0/hbm0", "p2/hbm0", "x/w", FULL, 6, entry.checksum)
    finally:
        ray.kill(a)
        ray.kill(b)
