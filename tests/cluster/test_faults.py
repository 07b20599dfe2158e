"""Faults with real actors killed: a HOST tier mid-transfer, a whole node, the controller.

After each: every block is readable through a lease and bit-exact against the checkpoint, no
lease was served from a copy being dropped (the controller's invariant counter stays 0), and the
registry matches the tier actors' inventories.
"""

from __future__ import annotations

import ray
import torch

from actors.client import PoolClient
from pool.tiers import TierKind
from tests.ray.helpers import make_pool, reference_tensors, settled, teardown, wait_until

MB = 1 << 20


def read_everything(namespace: str, pool, minilm_path, model: str = "minilm") -> int:
    """Lease, read and release every block of ``model``; compare each with the checkpoint."""
    specs = [s for s in ray.get(pool.storage().specs.remote()) if s.model == model]
    with PoolClient(namespace=namespace, acquire_timeout_s=60) as client:
        for spec in specs:
            got = client.get(spec.block_id)
            every = reference_tensors(minilm_path, spec.block_id.split("/", 1)[1])
            want = {name: every[name] for name in spec.names}
            assert set(got) == set(want), spec.block_id
            for name, tensor in want.items():
                assert torch.equal(got[name], tensor), (spec.block_id, name)
            client.release([spec.block_id])
    return len(specs)


def healthy(pool) -> None:
    status = pool.status()
    assert status["counters"].get("lease_violations", 0) == 0
    assert ray.get(pool.controller.consistency.remote()) == []


def test_host_tier_killed_mid_transfer(ray_cluster, tmp_path, minilm_path):
    pool = make_pool("t-hostkill", tmp_path, hbm_bytes_per_device=56 * MB)
    try:
        head = ray_cluster.head_node.node_id
        hbm = next(t for t in pool.tiers if t.kind is TierKind.HBM and t.node_id == head)
        host = next(t for t in pool.tiers if t.kind is TierKind.HOST and t.node_id == head)
        pool.load_checkpoint(minilm_path, "minilm", home=hbm.tier_id)
        wait_until(lambda: pool.status()["counters"].get("transfers", 0) >= 3, what="moving")
        ray.kill(pool.tier(host.tier_id), no_restart=False)  # Ray restarts it, empty
        wait_until(
            lambda: any(
                host.tier_id in r.detail
                for r in ray.get(pool.controller.audit.remote(kind="fault"))
            ),
            what="the fault noticed",
        )
        assert read_everything("t-hostkill", pool, minilm_path) == 54
        wait_until(lambda: settled(pool), what="settled")
        healthy(pool)
    finally:
        teardown("t-hostkill")


def test_node_removed(ray_cluster, tmp_path, minilm_path):
    doomed = ray_cluster.add_node(
        num_cpus=1, object_store_memory=200 << 20, resources={"weightpool_host": 1}
    )
    ray_cluster.wait_for_nodes()
    pool = make_pool("t-node", tmp_path, hbm_bytes_per_device=128 * MB)
    try:
        hbm = next(t for t in pool.tiers if t.kind is TierKind.HBM and t.node_id == doomed.node_id)
        pool.load_checkpoint(minilm_path, "minilm", home=hbm.tier_id)
        wait_until(
            lambda: pool.status()["states"] == {"premium": 54} and settled(pool),
            what="resident on the doomed node",
        )
        ray_cluster.remove_node(doomed)
        wait_until(
            lambda: pool.status()["models"]["minilm"] != hbm.tier_id,
            timeout_s=90,
            what="the model re-placed on a live device",
        )
        assert read_everything("t-node", pool, minilm_path) == 54
        assert hbm.tier_id in pool.status()["dead_tiers"]
        # A controller restarted after the node is gone finds its tiers' actors missing.
        ray.kill(pool.controller, no_restart=False)
        wait_until(lambda: _answers(pool), what="the controller back")
        status = pool.status()
        assert hbm.tier_id in status["dead_tiers"]
        assert status["models"]["minilm"] != hbm.tier_id
        assert read_everything("t-node", pool, minilm_path) == 54
        healthy(pool)
    finally:
        teardown("t-node")


def test_controller_killed_and_restarted(ray_cluster, tmp_path, minilm_path):
    pool = make_pool("t-restart", tmp_path, hbm_bytes_per_device=128 * MB)
    try:
        pool.load_checkpoint(minilm_path, "minilm")
        wait_until(
            lambda: pool.status()["states"] == {"premium": 54} and settled(pool),
            what="all premium",
        )
        block = "minilm/encoder.layer.4.output.dense"
        with PoolClient(namespace="t-restart") as client:
            client.get(block)
            lease = client.lease_of(block)
            before = {
                s.block_id: sorted(ray.get(pool.controller.copies.remote(s.block_id)))
                for s in ray.get(pool.storage().specs.remote())
            }
            ray.kill(pool.controller, no_restart=False)
            wait_until(lambda: _answers(pool), what="the controller back")
            after = {b: sorted(ray.get(pool.controller.copies.remote(b))) for b in before}
            assert after == before  # rebuilt from the inventories: same copies, same epochs
            (renewed,) = ray.get(pool.controller.renew.remote([lease]))
            assert renewed is not None and renewed.epoch == lease.epoch  # adopted by epoch
        assert read_everything("t-restart", pool, minilm_path) == 54
        healthy(pool)
    finally:
        teardown("t-restart")


def _answers(pool) -> bool:
    try:
        ray.get(pool.controller.status.remote(), timeout=2)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
