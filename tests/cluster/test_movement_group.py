"""Large copies between memory tiers on different nodes go through the pool's collective group
(``actors.executor.by_group``), verified and kept exactly as an object transfer is; small ones
stay on Ray's object transfer. On the session's real 3-node cluster."""

from __future__ import annotations

import ray
import torch

from actors.executor import GROUP_MIN_BYTES, by_group
from pool.tiers import TierKind
from tests.ray.helpers import make_pool, reads_back_on, settled, teardown, wait_until

MB = 1 << 20
HBM, HOST, CXL, STORAGE = TierKind.HBM, TierKind.HOST, TierKind.CXL, TierKind.STORAGE


def test_the_route_of_each_copy():
    """The group: across nodes, at the held encoding, between memory tiers; HBM pairs always,
    other pairs from GROUP_MIN_BYTES on. Everything else: Ray's object transfer."""
    big, small = GROUP_MIN_BYTES, GROUP_MIN_BYTES - 1
    assert by_group(HBM, HBM, True, True, 1)
    assert by_group(HOST, HBM, True, True, big) and by_group(HBM, CXL, True, True, big)
    assert not by_group(HOST, HBM, True, True, small)
    assert not by_group(HOST, HBM, False, True, big)  # within a node: the object store maps it
    assert not by_group(HBM, HBM, True, False, big)  # the source transcodes: object transfer
    assert not by_group(STORAGE, HBM, True, True, big)  # storage is not in the group


def weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    # 16 MiB each at full precision: at the group's threshold.
    return {f"layers.{i}.weight": torch.randn(4096, 1024, generator=gen) for i in range(2)}


def test_a_drain_moves_large_blocks_through_the_group(ray_cluster, tmp_path):
    """Draining a device moves its model to another node: the warm HOST copies there are made
    from the old node's HOST copies through the group (16 MiB each), verified; the model then
    reads back bit-exact from its new device and the registry matches the tiers."""
    pool = make_pool("t-move-group", tmp_path, hbm_bytes_per_device=40 * MB)
    try:
        workers = sorted(n.node_id for n in ray_cluster.worker_nodes)
        hbm = {t.node_id: t.tier_id for t in pool.tiers if t.kind is TierKind.HBM}
        old = hbm[workers[0]]
        assert pool.load_state_dict(weights(), "g", home=old) == old
        blocks = ["g/layers.0", "g/layers.1"]
        wait_until(
            lambda: settled(pool) and pool.status()["states"] == {"premium": 2}, what="premium"
        )
        assert "peer_copies" not in pool.status()["counters"]  # all within the home's node
        ray.get(pool.controller.drain.remote(old))

        def new_device() -> set[str]:
            found = set()
            for block in blocks:
                copies = ray.get(pool.controller.copies.remote(block))
                found |= {c[0] for c in copies if c[2] == "ready" and c[0] in hbm.values()}
            return found - {old}

        wait_until(lambda: len(new_device()) == 1 and settled(pool), what="the model moved")
        (successor,) = new_device()
        counters = pool.status()["counters"]
        assert counters["peer_copies"] == 2
        assert counters.get("peer_fallbacks", 0) == 0
        assert counters["bytes:host->peer"] == 2 * 16 * MB
        want = weights()
        expected = {block: want[f"layers.{i}.weight"] for i, block in enumerate(blocks)}
        reads_back_on(pool, "t-move-group", successor, expected)
    finally:
        teardown("t-move-group")
