"""Leases kept until recalled (actors/leases.py, granting.py, client.py), on the real Ray cluster.

One pool with 24 MiB of HBM and a 3 s lease time-to-live. Model ``a`` (12 layers of 1 MiB) runs
through ``manage`` and keeps its leases; model ``b`` (14 blocks of 1 MiB) is the pressure: a plain
client demands all of it with hard leases, so that at least 2 copies of ``a`` have to leave the
HBM while ``a`` holds leases on them.
"""

from __future__ import annotations

import threading

import pytest
import ray
import torch
from torch import nn

from actors.client import PoolClient
from actors.integration import manage
from pool.tiers import TierKind
from tests.ray.helpers import make_pool, settled, teardown, wait_until

MB = 1 << 20
NAMESPACE = "t-recall"
LAYERS = 12
A_BLOCKS = [f"a/layers.{i}" for i in range(LAYERS)]
B_BLOCKS = [f"b/layers.{i}" for i in range(14)]


class Stack(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(512, 512, bias=False) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.fixture(scope="module")
def pool(ray_cluster, tmp_path_factory):
    pool = make_pool(
        NAMESPACE,
        tmp_path_factory.mktemp("recall"),
        hbm_bytes_per_device=24 * MB,
        lease_ttl_s=3.0,
    )
    home = next(t.tier_id for t in pool.tiers if t.kind is TierKind.HBM)
    pool.load_state_dict(Stack(0).state_dict(), "a", home=home)
    wait_until(lambda: all(on_hbm(pool, b) for b in A_BLOCKS) and settled(pool), what="a")
    yield pool, home
    teardown(NAMESPACE)


@pytest.fixture(scope="module")
def with_b(pool):
    """Model ``b`` loaded beside ``a`` (placed while idle; demanded by :func:`demand_b`)."""
    p, home = pool
    generator = torch.Generator().manual_seed(2)
    weights = {f"layers.{i}.weight": torch.randn(512, 512, generator=generator) for i in range(14)}
    p.load_state_dict(weights, "b", home=home)
    wait_until(lambda: settled(p), what="b placed")
    return pool


@pytest.fixture(scope="module")
def managed_a(pool):
    """Model ``a`` managed through its own client, and the unmanaged model's output."""
    _, home = pool
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = Stack(0)(x)
    client = PoolClient(namespace=NAMESPACE, device=home)
    managed = manage(Stack(5), client, "a")  # other weights: the pool's replace them
    yield client, managed, x, want
    managed.remove()
    client.close()


def on_hbm(pool, block_id: str) -> int | None:
    """The epoch of the block's ready HBM copy, if it has one."""
    copies = ray.get(pool.controller.copies.remote(block_id))
    return next((e for t, _, s, e in copies if "/hbm" in t and s == "ready"), None)


def counters(pool) -> dict[str, int]:
    return pool.status()["counters"]


def forward(managed, x):
    with torch.inference_mode():
        return managed.model(x)


def demand_b(home: str) -> tuple[threading.Thread, PoolClient, list]:
    """A plain client acquiring every block of ``b`` (hard leases), in a thread: it waits
    until 14 MiB are free beside ``a``, so copies of ``a`` must leave the HBM."""
    client = PoolClient(namespace=NAMESPACE, device=home, acquire_timeout_s=60)
    done: list = []

    def run() -> None:
        try:
            done.append(client.acquire(B_BLOCKS))
        except Exception as err:  # shown by the test's assertion
            done.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, client, done


def test_kept_leases_are_hits_on_later_forwards_with_no_remote_call(pool, managed_a):
    p, _ = pool
    client, managed, x, want = managed_a
    before = counters(p)
    assert torch.equal(forward(managed, x), want)
    first = counters(p)
    grants = ("lease_grants_resident", "lease_grants_after_miss")
    assert sum(first.get(k, 0) - before.get(k, 0) for k in grants) == LAYERS  # one per layer
    assert all(client.lease_of(b).recallable for b in A_BLOCKS)
    for _ in range(2):
        assert torch.equal(forward(managed, x), want)
    ids = {b: client.lease_of(b).lease_id for b in A_BLOCKS}
    # Past the first expiry: every kept lease was renewed after its first time-to-live ended.
    first_expiry = max(client.lease_of(b).expires_s for b in A_BLOCKS)
    wait_until(
        lambda: min(client.lease_of(b).expires_s for b in A_BLOCKS) > first_expiry + 3.0,
        what="renewals past the first expiry",
    )
    assert torch.equal(forward(managed, x), want)
    after = counters(p)
    for key in ("lease_grants_resident", "lease_grants_after_miss", "lease_misses"):
        assert after.get(key, 0) == first.get(key, 0), key
    assert {b: client.lease_of(b).lease_id for b in A_BLOCKS} == ids
    # The policy does not see kept leases as pins: the status counts them, the veto never fired.
    assert after.get("veto:leased", 0) == 0


def test_under_pressure_the_recalled_lease_is_released_at_a_safe_point_then_the_copy_moves(
    with_b, managed_a
):
    p, home = with_b
    client, managed, x, want = managed_a
    before = counters(p)
    with client.using():  # a use in progress: no lease is released but at its safe points
        assert torch.equal(forward(managed, x), want)  # a's layers leased (again) and kept
        epochs = {b: on_hbm(p, b) for b in A_BLOCKS if client.lease_of(b) is not None}
        assert epochs and None not in epochs.values()
        thread, b_client, done = demand_b(home)
        wait_until(lambda: client.recalled, what="a recall reaches the client")
        steps = counters(p)["steps"]
        wait_until(lambda: counters(p)["steps"] > steps + 10, what="steps")
        assert {b: on_hbm(p, b) for b in epochs} == epochs  # nothing leased moved
        assert thread.is_alive() and not done, done  # b waits for the room a's leases pin
        recalled = {b for b in epochs if client.lease_of(b).lease_id in client.recalled}
        assert recalled and all(client.lease_of(b) is not None for b in epochs)
    # The outermost use ended: the recalled leases are released, their copies move.
    try:
        thread.join(timeout=90)
    finally:
        b_client.close()
    assert done and isinstance(done[0], dict) and not thread.is_alive(), done
    gone = {b for b in epochs if client.lease_of(b) is None}
    assert recalled <= gone
    moved = {b for b in epochs if on_hbm(p, b) != epochs[b]}
    assert moved and moved <= gone  # only copies whose kept lease was released moved
    for block in moved:
        leases = ray.get(p.controller.audit.remote(kind="lease", block_id=block))
        moves = ray.get(p.controller.audit.remote(kind="transition", block_id=block))
        released = [r.time_s for r in leases if "released on recall" in r.detail]
        assert released and moves and max(released) <= moves[-1].time_s, block
    after = counters(p)
    assert after.get("lease_violations", 0) == 0
    # The executor never even tried to drop a leased copy: the moves waited for the release.
    deferred = [
        str(r) for r in ray.get(p.controller.audit.remote(kind="execute")) if "deferred" in r.detail
    ]
    assert after.get("drops_deferred_leased", 0) == before.get("drops_deferred_leased", 0), deferred
    assert torch.equal(forward(managed, x), want)  # a leases what moved again, bit-exact


def test_a_holder_that_never_answers_a_recall_loses_the_lease_at_its_ttl(with_b, managed_a):
    p, home = with_b
    client, managed, *_ = managed_a
    managed.remove()  # releases a's kept leases: the deaf holder below is the only one
    client.close()
    grants = ray.get(p.controller.acquire.remote("deaf", A_BLOCKS, home, 60.0, True))
    held = {g.lease.block_id: g.lease for g in grants}
    assert set(held) == set(A_BLOCKS) and all(x.recallable for x in held.values())
    thread, b_client, done = demand_b(home)
    recalled: dict[str, float] = {}  # block -> the expiry its lease kept after the recall
    fenced: set[str] = set()
    try:
        # The deaf holder renews its leases and never releases: the recalled ones are not
        # extended, expire, and only then do their copies move.
        def renew_and_check() -> bool:
            ids = set(ray.get(p.controller.recalled.remote("deaf")))
            live = [x for b, x in held.items() if b not in fenced]
            for old, new in zip(live, ray.get(p.controller.renew.remote(live)), strict=True):
                if new is None:
                    assert old.block_id in recalled, old.block_id  # only recalled ones end
                    fenced.add(old.block_id)
                    continue
                if old.lease_id in ids:
                    expiry = recalled.setdefault(old.block_id, new.expires_s)
                    assert new.expires_s == expiry  # not extended after the recall
                held[old.block_id] = new
            return bool(done)

        wait_until(renew_and_check, timeout_s=90, what="b granted after the deaf leases ended")
    finally:
        thread.join(timeout=90)
        b_client.close()
    assert isinstance(done[0], dict), done
    moved = {b for b in A_BLOCKS if on_hbm(p, b) != held[b].epoch}
    assert moved and moved <= fenced <= set(recalled), (moved, fenced, recalled)
    for block in fenced:  # never released: each ended by its time-to-live
        records = ray.get(p.controller.audit.remote(kind="lease", block_id=block))
        assert not any(f"{held[block].lease_id} released" in r.detail for r in records)
    assert counters(p).get("lease_violations", 0) == 0
    ray.get(p.controller.release.remote([x for b, x in held.items() if b not in fenced]))


def test_a_drain_recalls_kept_leases_and_completes(with_b):
    p, home = with_b
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = Stack(0)(x)
    with PoolClient(namespace=NAMESPACE, device=home) as client:
        managed = manage(Stack(5), client, "a")
        assert torch.equal(forward(managed, x), want)
        kept = {b for b in A_BLOCKS if client.lease_of(b).tier_id == home}
        assert kept  # leases kept on copies of the tier about to be drained
        ray.get(p.controller.drain.remote(home))
        try:
            # The client is idle: the recalled leases are released at once, the copies go.
            wait_until(
                lambda: not any(on_hbm_of(p, b, home) for b in A_BLOCKS), what="a's copies gone"
            )
            assert all(client.lease_of(b) is None for b in kept)
            for block in kept:
                records = ray.get(p.controller.audit.remote(kind="lease", block_id=block))
                assert any("released on recall" in r.detail for r in records), block
            new_home = p.status()["models"]["a"]
            assert new_home != home
            assert torch.equal(forward(managed, x), want)  # leased again, on the new home
            assert all(client.lease_of(b).tier_id == new_home for b in A_BLOCKS)
        finally:
            ray.get(p.controller.undrain.remote(home))
        managed.remove()
    assert counters(p).get("lease_violations", 0) == 0


def on_hbm_of(pool, block_id: str, tier_id: str) -> bool:
    copies = ray.get(pool.controller.copies.remote(block_id))
    return any(t == tier_id for t, _, _, _ in copies)
