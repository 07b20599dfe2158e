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
from tests.ray.helpers import make_pool, settled, teardown, wait_until

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


def test_a_drained_device_fills_its_successor_by_peer_copies(peered):
    """Leased copies on a drained device cannot be dropped; the model's new device is filled from
    them by peer copies through the gloo group, each verified, and reads back bit-exact."""
    pool, hbm, old = peered
    blocks = [f"m/layers.{i}" for i in range(LAYERS)]
    wait_until(
        lambda: pool.status()["states"] == {"premium": LAYERS} and settled(pool), what="premium"
    )
    with PoolClient(namespace="t-peer", device=old) as holder:
        for block in blocks:
            holder.get(block)  # leased: the drain must leave these copies until released
        ray.get(pool.controller.drain.remote(old))

        def on_new_home() -> bool:
            homes = []
            for block in blocks:
                copies = ray.get(pool.controller.copies.remote(block))
                homes.append({c[0] for c in copies if c[2] == "ready" and c[0] in hbm.values()})
            return all(len(h - {old}) == 1 for h in homes)

        wait_until(on_new_home, what="every block on the new device")
        counters = pool.status()["counters"]
        assert counters.get("peer_copies", 0) == LAYERS
        assert counters.get("peer_fallbacks", 0) == 0
        assert counters["bytes:hbm->peer"] == LAYERS * 256 * 512 * 4
    new_home = {
        c[0] for c in ray.get(pool.controller.copies.remote(blocks[0])) if c[0] != old
    } & set(hbm.values())
    (successor,) = new_home
    want = weights()
    with PoolClient(namespace="t-peer", device=successor) as client:
        for i, block in enumerate(blocks):
            got = client.get(block)
            assert client.lease_of(block).tier_id == successor
            assert torch.equal(got["weight"], want[f"layers.{i}.weight"]), block
    wait_until(lambda: settled(pool), what="settled")
    assert ray.get(pool.controller.consistency.remote()) == []


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
