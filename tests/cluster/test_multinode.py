"""Several nodes: tier actors on every node, blocks placed across nodes, the peer path."""

from __future__ import annotations

import pytest
import ray
import torch

from actors.client import PoolClient
from pool.tiers import TierKind
from tests.ray.helpers import make_pool, reference_tensors, settled, teardown, wait_until

MB = 1 << 20


@pytest.fixture(scope="module")
def spread(ray_cluster, tmp_path_factory, minilm_path):
    pool = make_pool(
        "t-spread",
        tmp_path_factory.mktemp("spread"),
        hbm_bytes_per_device=128 * MB,
        cxl_bytes=256 * MB,
    )
    head = ray_cluster.head_node.node_id
    workers = sorted(n.node_id for n in ray_cluster.worker_nodes)
    hbm = {t.node_id: t.tier_id for t in pool.tiers if t.kind is TierKind.HBM}
    assert pool.load_checkpoint(minilm_path, "a", home=hbm[workers[0]]) == hbm[workers[0]]
    assert pool.load_checkpoint(minilm_path, "b", home=hbm[workers[1]]) == hbm[workers[1]]
    yield pool, head, workers, hbm
    teardown("t-spread")


def test_tier_actors_run_on_their_own_nodes(spread, ray_cluster):
    pool, head, workers, _ = spread
    for info in pool.tiers:
        assert ray.get(pool.tier(info.tier_id).ping.remote()) == info.node_id, info.tier_id
    kinds = {}
    for info in pool.tiers:
        kinds.setdefault(info.node_id, set()).add(info.kind)
    assert kinds[head] == {TierKind.HBM, TierKind.HOST, TierKind.STORAGE}
    assert sorted((kinds[w] for w in workers), key=len) == [
        {TierKind.HBM, TierKind.HOST},
        {TierKind.HBM, TierKind.HOST, TierKind.CXL},
    ]
    cxl = [i for i in pool.tiers if i.kind is TierKind.CXL]
    assert len(cxl) == 1 and cxl[0].spec.emulated
    assert ray.get(pool.tier(cxl[0].tier_id).ping.remote()) in workers
    assert all(i.spec.emulated for i in pool.tiers if i.kind is TierKind.HBM)


def test_blocks_are_placed_across_nodes_and_read_as_peers(spread, minilm_path):
    pool, head, workers, hbm = spread
    wait_until(
        lambda: pool.status()["states"] == {"premium": 108} and settled(pool),
        what="both models premium",
    )
    module = "encoder.layer.2.output.dense"
    for model, node in (("a", workers[0]), ("b", workers[1])):
        copies = ray.get(pool.controller.copies.remote(f"{model}/{module}"))
        assert (hbm[node], "full", "ready") in {c[:3] for c in copies}, copies
        host = [c for c in copies if c[0].endswith("/host")]
        assert host and host[0][0].split("/")[0] == node[:8]  # the warm copy is on its node
    # A consumer on the head node's device reads model b's block from worker 2's HBM: a peer.
    with PoolClient(namespace="t-spread", device=hbm[head]) as client:
        got = client.get(f"b/{module}")
        assert client.cache[f"b/{module}"].peer
        assert client.lease_of(f"b/{module}").tier_id == hbm[workers[1]]
    want = reference_tensors(minilm_path, module)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    counters = pool.status()["counters"]
    full = sum(spec.full_nbytes for spec in ray.get(pool.storage().specs.remote()))
    assert counters["bytes:storage->host"] == full  # each block warmed once, across nodes
    assert ray.get(pool.controller.consistency.remote()) == []


def test_a_node_that_joins_later_gets_its_tiers(ray_cluster, tmp_path, minilm_path):
    """KubeRay starts the pool on the head before the GPU workers are up: a node that joins a
    running pool gets its tiers (same rule, same ids) and models can be placed on it."""
    pool = make_pool("t-join", tmp_path, hbm_bytes_per_device=128 * MB, node_scan_s=0.5)
    joined = ray_cluster.add_node(
        num_cpus=1, object_store_memory=200 << 20, resources={"weightpool_host": 1}
    )
    ray_cluster.wait_for_nodes()
    try:
        prefix = joined.node_id[:8]
        new = {f"{prefix}/hbm0", f"{prefix}/host"}
        wait_until(
            lambda: new <= {t for t, r in pool.status()["tiers"].items() if r is not None},
            what="the joined node's tiers",
        )
        for tier_id in new:
            assert ray.get(pool.tier(tier_id).ping.remote()) == joined.node_id
        assert pool.load_checkpoint(minilm_path, "late", home=f"{prefix}/hbm0") == f"{prefix}/hbm0"
        wait_until(
            lambda: pool.status()["states"] == {"premium": 54} and settled(pool),
            what="the model resident on the joined node's device",
        )
        assert pool.status()["tiers"][f"{prefix}/hbm0"].used_bytes > 80 * MB
        with PoolClient(namespace="t-join", device=f"{prefix}/hbm0") as client:
            got = client.get("late/encoder.layer.2.output.dense")
        want = reference_tensors(minilm_path, "encoder.layer.2.output.dense")
        assert all(torch.equal(got[k], v) for k, v in want.items())
        assert ray.get(pool.controller.consistency.remote()) == []
    finally:
        teardown("t-join")
        ray_cluster.remove_node(joined)
