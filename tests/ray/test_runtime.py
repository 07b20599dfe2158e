"""The runtime on a real Ray cluster: tier actors, the controller's loop, leases, telemetry.

Pools here are placed for the driver node's HBM tier; every check reads real bytes back through
leases and compares them with the checkpoint, bit for bit.
"""

from __future__ import annotations

import dataclasses

import pytest
import ray
import torch

from actors.client import PoolClient
from actors.config import ConfigError, load_config
from pool.encoding import Encoding
from pool.errors import DuplicateBlockError, UnknownBlockError
from tests.ray.helpers import make_pool, reference_tensors, settled, teardown, wait_until

MB = 1 << 20


@pytest.fixture(scope="module")
def roomy(ray_cluster, tmp_path_factory, minilm_path):
    """MiniLM (87 MiB) in a pool whose HBM holds all of it."""
    pool = make_pool("t-roomy", tmp_path_factory.mktemp("roomy"), hbm_bytes_per_device=128 * MB)
    pool.load_checkpoint(minilm_path, "minilm")
    yield pool
    teardown("t-roomy")


def states(pool) -> dict[str, int]:
    return pool.status()["states"]


def test_every_block_reaches_hbm_and_reads_back_bit_exact(roomy, minilm_path):
    wait_until(lambda: states(roomy) == {"premium": 54} and settled(roomy), what="all premium")
    with PoolClient(namespace="t-roomy") as client:
        for module in ("embeddings.word_embeddings", "encoder.layer.3.attention.self.query"):
            got = client.get(f"minilm/{module}")
            want = reference_tensors(minilm_path, module)
            assert set(got) == set(want)
            for name, tensor in want.items():
                assert torch.equal(got[name], tensor), (module, name)
    assert ray.get(roomy.controller.consistency.remote()) == []
    counters = roomy.status()["counters"]
    assert counters["bytes:storage->host"] > 0 and counters["bytes:host->hbm"] > 0
    assert counters.get("lease_violations", 0) == 0


def test_a_hit_is_served_in_process_and_counted_by_telemetry(roomy):
    wait_until(lambda: settled(roomy), what="settled")
    block = "minilm/encoder.layer.0.output.dense"
    with PoolClient(namespace="t-roomy", flush_s=0.02) as client:
        first = client.get(block)
        before = roomy.status()["counters"]
        for _ in range(1000):
            assert client.get(block) is first  # the cached, mapped tensors: no remote call
        client.flush()
        wait_until(
            lambda: (
                roomy.status()["counters"].get("cache_hits", 0)
                >= before.get("cache_hits", 0) + 1000
            ),
            what="hits reported",
        )
        after = roomy.status()["counters"]
    for key in ("lease_grants_resident", "lease_grants_after_miss", "lease_misses"):
        assert after.get(key, 0) == before.get(key, 0), key


def test_renewal_is_fenced(roomy):
    block = "minilm/encoder.layer.1.output.dense"
    other = "minilm/encoder.layer.2.output.dense"
    with PoolClient(namespace="t-roomy") as client:
        client.get(block)
        client.get(other)
        lease, other_lease = client.lease_of(block), client.lease_of(other)
        # The same id presented for another block (or another epoch) is refused.
        wrong = dataclasses.replace(other_lease, lease_id=lease.lease_id)
        stale = dataclasses.replace(lease, epoch=lease.epoch + 1)
        assert ray.get(roomy.controller.renew.remote([wrong, stale])) == [None, None]
        assert ray.get(roomy.controller.release.remote([wrong])) == 0
        (renewed,) = ray.get(roomy.controller.renew.remote([lease]))
        assert renewed is not None and renewed.lease_id == lease.lease_id
    # Released by close(): renewing it now is refused, not re-adopted.
    assert ray.get(roomy.controller.renew.remote([lease])) == [None]
    # A lease of an earlier controller instance (as after a restart) is adopted only at its
    # copy's current epoch.
    earlier = dataclasses.replace(lease, lease_id="0123456789ab-7")
    forged = dataclasses.replace(earlier, lease_id="0123456789ab-8", epoch=lease.epoch + 999)
    renewed = ray.get(roomy.controller.renew.remote([forged, earlier]))
    assert renewed[0] is None
    assert renewed[1] is not None and renewed[1].epoch == lease.epoch
    assert ray.get(roomy.controller.release.remote([renewed[1]])) == 1


def test_bad_input_is_refused_and_changes_nothing(roomy, minilm_path, tmp_path):
    before = roomy.status()
    with PoolClient(namespace="t-roomy") as client, pytest.raises(UnknownBlockError, match="nope"):
        client.acquire(["minilm/encoder.layer.0.output.dense", "minilm/nope"])
    assert roomy.status()["leases"] == before["leases"]
    with pytest.raises(DuplicateBlockError, match="minilm"):
        roomy.load_checkpoint(minilm_path, "minilm")
    with pytest.raises(UnknownBlockError, match="not a live HBM tier"):
        roomy.load_checkpoint(minilm_path, "other", home="no/such-tier")
    assert roomy.status()["blocks"] == before["blocks"]
    specs = ray.get(roomy.storage().specs.remote())
    assert {s.model for s in specs} == {"minilm"}  # nothing imported for the refused load
    bad = tmp_path / "pool.yaml"
    bad.write_text("host_bytes: -5\nnot_a_key: 1\n")
    with pytest.raises(ConfigError, match=r"host_bytes=-5.*not_a_key=1"):
        load_config(bad)


def test_consistency_names_a_copy_lost_behind_the_registrys_back(roomy):
    # The last test of this pool: it leaves the registry and a tier disagreeing on purpose.
    wait_until(lambda: settled(roomy), what="settled")
    block = "minilm/encoder.layer.5.output.dense"
    copies = ray.get(roomy.controller.copies.remote(block))
    tier_id, encoding = next((t, e) for t, e, status, _ in copies if t.endswith("/hbm0"))
    ray.get(roomy.tier(tier_id).drop.remote(block, Encoding.parse(encoding)))
    problems = ray.get(roomy.controller.consistency.remote())
    assert f"{tier_id}: registry lists {block}@{encoding}, tier lacks it" in problems


def synthetic_weights(blocks: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """``blocks`` blocks of 1 MiB (random float32), one module each."""
    generator = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(512, 512, generator=generator) for i in range(blocks)}


@pytest.fixture(scope="module")
def tight(ray_cluster, tmp_path_factory):
    """64 blocks of 1 MiB in a pool with 24 MiB of HBM: placement must choose."""
    pool = make_pool("t-tight", tmp_path_factory.mktemp("tight"), hbm_bytes_per_device=24 * MB)
    pool.load_state_dict(synthetic_weights(), "syn")
    wait_until(lambda: settled(pool) and pool.status()["counters"].get("steps", 0) > 5)
    yield pool
    teardown("t-tight")


def resident(pool, block_id: str) -> bool:
    return any(
        "/hbm" in tier and state == "ready"
        for tier, _, state, _ in ray.get(pool.controller.copies.remote(block_id))
    )


def test_a_miss_becomes_a_demand_promotion(tight):
    weights = synthetic_weights()
    cold = [f"syn/layers.{i}" for i in range(64) if not resident(tight, f"syn/layers.{i}")]
    assert len(cold) >= 32, "24 MiB of HBM cannot hold 64 blocks of 1 MiB"
    block = cold[0]
    before = tight.status()["counters"]
    with PoolClient(namespace="t-tight") as client:
        got = client.get(block)
    assert torch.equal(got["weight"], weights[block.split("/", 1)[1] + ".weight"])
    after = tight.status()["counters"]
    assert after["lease_misses"] == before.get("lease_misses", 0) + 1
    assert after["lease_grants_after_miss"] == before.get("lease_grants_after_miss", 0) + 1
    executed = ray.get(tight.controller.audit.remote(kind="execute", block_id=block))
    assert any("hbm0@full" in r.detail for r in executed)


def test_capacity_is_never_exceeded_and_leased_copies_stay(tight):
    held = [f"syn/layers.{i}" for i in range(64) if resident(tight, f"syn/layers.{i}")][:4]
    with PoolClient(namespace="t-tight") as client:
        client.acquire(held)
        epochs = {b: client.lease_of(b).epoch for b in held}
        # Pressure: a second model placed for the same device wants the HBM too.
        home = tight.status()["models"]["syn"]
        tight.load_state_dict(synthetic_weights(seed=1), "syn2", home=home)
        steps = tight.status()["counters"]["steps"]
        wait_until(lambda: tight.status()["counters"]["steps"] > steps + 20, what="steps")
        wait_until(lambda: settled(tight), what="settled")
        for block_id, epoch in epochs.items():
            copies = ray.get(tight.controller.copies.remote(block_id))
            assert any(t.endswith("hbm0") and e == epoch for t, _, _, e in copies), block_id
    status = tight.status()
    for report in status["tiers"].values():
        if report.capacity_bytes is not None:
            assert report.used_bytes <= report.capacity_bytes, report
    assert status["counters"].get("lease_violations", 0) == 0
    assert ray.get(tight.controller.consistency.remote()) == []
