"""The admin API on a real pool: a uvicorn server on loopback (a thread of this process) talking
to the controller of a pool on the shared 3-node Ray cluster.

The pool holds 32 synthetic blocks of 1 MiB whose home HBM tier has 24 MiB: placement must choose,
so some blocks are cold. Tests run in file order on one pool and leave its goals and policy as
they found them; the fuzzing runs last.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import requests
import torch

from actors.client import PoolClient
from api.admin import create_app, openapi_spec
from tests.ray.admin_helpers import free_port, fuzz, scrape, serving
from tests.ray.helpers import make_pool, settled, teardown, wait_until

NS = "t-admin"
TOKEN = "test-admin-token-4f1c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MB = 1 << 20
BLOCKS = 32
WEIGHTPOOL = str(Path(sys.executable).parent / "weightpool")  # the console script


@pytest.fixture(scope="module")
def pool(ray_cluster, tmp_path_factory):
    pool = make_pool(NS, tmp_path_factory.mktemp("admin"), hbm_bytes_per_device=24 * MB)
    generator = torch.Generator().manual_seed(7)
    weights = {f"layers.{i}.weight": torch.randn(512, 512, generator=generator) for i in range(32)}
    pool.load_state_dict(weights, "syn")
    wait_until(lambda: settled(pool) and pool.status()["counters"].get("steps", 0) > 5)
    yield pool
    teardown(NS)


@pytest.fixture(scope="module")
def api(pool) -> Iterator[str]:
    with serving(create_app(NS, token=TOKEN)) as base:
        yield base


def get(base: str, path: str, **params: Any) -> Any:
    response = requests.get(base + path, params=params, timeout=60)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.json()


def home_of(pool) -> str:
    return pool.status()["models"]["syn"]


def hbm_epoch(pool, block_id: str, tier_id: str) -> int | None:
    for tier, encoding, status, epoch in ray.get(pool.controller.copies.remote(block_id)):
        if tier == tier_id and encoding == "full" and status == "ready":
            return int(epoch)
    return None


def used_bytes(pool, tier_id: str) -> int:
    return int(ray.get(pool.tier(tier_id).report.remote()).used_bytes)


# -- reads --------------------------------------------------------------------------------------


def test_reads_show_tiers_blocks_and_one_block_in_full(pool, api):
    assert get(api, "/health")["blocks"] == BLOCKS
    tiers = {t["tier_id"]: t for t in get(api, "/tiers")["tiers"]}
    assert set(tiers) == {t.tier_id for t in pool.tiers}
    home = tiers[home_of(pool)]
    assert (home["kind"], home["capacity_bytes"], home["emulated"], home["alive"]) == (
        "hbm",
        24 * MB,
        True,
        True,
    )
    assert home["used_bytes"] == used_bytes(pool, home["tier_id"]) > 0
    assert [t["kind"] for t in tiers.values()].count("storage") == 1

    page = get(api, "/blocks", model="syn", limit=5, offset=30)
    assert (page["total"], page["next_offset"]) == (BLOCKS, None)
    assert [b["block_id"] for b in page["blocks"]] == ["syn/layers.30", "syn/layers.31"]
    assert get(api, "/blocks", limit=5)["next_offset"] == 5
    assert get(api, "/blocks", kind="dense")["total"] == BLOCKS
    assert get(api, "/blocks", kind="expert")["total"] == 0
    layer = get(api, "/blocks", layer=3)["blocks"]
    assert [b["block_id"] for b in layer] == ["syn/layers.3"]
    states = pool.status()["states"]
    for state, count in states.items():
        assert get(api, "/blocks", state=state)["total"] == count, state
    on_home = get(api, "/blocks", tier=home["tier_id"], limit=1000)["blocks"]
    assert {b["state"] for b in on_home} == {"premium"}
    assert len(on_home) == states["premium"]

    resident = on_home[0]["block_id"]
    with PoolClient(namespace=NS) as client:
        client.get(resident)
        lease = client.lease_of(resident)
        detail = get(api, f"/blocks/{resident}")
    assert detail["block"]["state"] == "premium"
    assert detail["shapes"] == {"weight": [512, 512]} and detail["dtype"] == "float32"
    assert {(c["tier_id"], c["encoding"]) for c in detail["copies"]} >= {(home["tier_id"], "full")}
    assert [(x["lease_id"], x["holder"]) for x in detail["leases"]] == [
        (lease.lease_id, lease.holder)
    ]
    assert any(e["kind"] == "transition" and e["to_state"] == "premium" for e in detail["history"])
    transitions = get(api, "/transitions", block=resident)
    assert transitions["total"] >= 1
    assert {e["block_id"] for e in transitions["entries"]} == {resident}


def test_unknown_ids_and_bad_filters(api):
    for path in ("/blocks/syn/nope", "/blocks?tier=no/such-tier", "/blocks?model=nope"):
        response = requests.get(api + path, timeout=60)
        assert response.status_code == 404, path
        assert "nope" in response.json()["detail"] or "no/such-tier" in response.json()["detail"]
    for path in ("/blocks/syn/nope/pin", "/tiers/no/such/drain"):
        response = requests.post(api + path, headers=AUTH, timeout=60)
        assert response.status_code == 404, path
        assert path.split("/", 2)[2].rsplit("/", 1)[0] in response.json()["detail"]
    response = requests.get(api + "/blocks", params={"state": "lukewarm", "limit": 0}, timeout=60)
    assert response.status_code == 422
    assert {tuple(e["loc"]) for e in response.json()["detail"]} == {
        ("query", "state"),
        ("query", "limit"),
    }


# -- authorization ------------------------------------------------------------------------------


def test_mutating_calls_need_the_token(pool, api, monkeypatch):
    block = "syn/layers.0"
    calls = [
        ("post", f"/blocks/{block}/pin", None),
        ("delete", f"/blocks/{block}/pin", None),
        ("post", f"/tiers/{home_of(pool)}/drain", None),
        ("delete", f"/tiers/{home_of(pool)}/drain", None),
        ("put", "/policy", {"quality_budget": 0.5}),
    ]
    before = (get(api, "/goals"), get(api, "/policy"))
    for method, path, body in calls:
        missing = requests.request(method, api + path, json=body, timeout=60)
        assert missing.status_code == 401, (method, path)
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        wrong = requests.request(
            method, api + path, json=body, headers={"Authorization": "Bearer x"}, timeout=60
        )
        assert wrong.status_code == 401 and "wrong" in wrong.json()["detail"], (method, path)
    monkeypatch.delenv("WEIGHTPOOL_ADMIN_TOKEN", raising=False)
    with serving(create_app(NS)) as open_api:
        for method, path, body in calls:
            refused = requests.request(method, open_api + path, json=body, headers=AUTH, timeout=60)
            assert refused.status_code == 403, (method, path)
            assert "WEIGHTPOOL_ADMIN_TOKEN" in refused.json()["detail"]
        assert get(open_api, "/policy") == before[1]  # reads stay open
    assert (get(api, "/goals"), get(api, "/policy")) == before


# -- policy -------------------------------------------------------------------------------------


def test_a_bad_policy_is_422_naming_field_and_value_and_changes_nothing(pool, api):
    before = ray.get(pool.controller.policy.remote())
    cases = [
        ({"hbm_headroom_fraction": 1.5}, "hbm_headroom_fraction", "1.5"),
        ({"tick_s": -1}, "tick_s", "-1"),
        ({"tick_s": 3600}, "tick_s", "3600"),
        ({"not_a_knob": 1}, "not_a_knob", "1"),
        ({"imminent_horizon_s": 0.001}, "imminent_horizon_s", "0.001"),  # < safety_margin_s
    ]
    for body, field, value in cases:
        response = requests.put(api + "/policy", json=body, headers=AUTH, timeout=60)
        assert response.status_code == 422, body
        (error,) = response.json()["detail"]
        assert field in error["msg"] and value in error["msg"], error
    assert ray.get(pool.controller.policy.remote()) == before
    assert get(api, "/policy") == before.model_dump()


def test_pin_keeps_a_block_premium_in_hbm_through_pressure(pool, api):
    """Pin a cold block; then a new policy (90 % of HBM kept free) evicts almost everything
    else from its tier, and the pinned copy stays, the same copy at the same epoch."""
    home = home_of(pool)
    cold = [
        b["block_id"]
        for b in get(api, "/blocks", limit=1000)["blocks"]
        if home not in b["tiers"] and b["state"] != "promoting"
    ]
    assert len(cold) >= 8, "24 MiB of HBM cannot hold 32 blocks of 1 MiB"
    block, second, third = cold[0], cold[1], cold[2]
    pinned = requests.post(f"{api}/blocks/{block}/pin", headers=AUTH, timeout=60)
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    wait_until(lambda: get(api, f"/blocks/{block}")["pin"]["satisfied"], what="pin satisfied")
    assert get(api, f"/blocks/{block}")["block"]["state"] == "premium"
    epoch = hbm_epoch(pool, block, home)
    assert epoch is not None
    try:
        response = requests.put(
            api + "/policy", json={"hbm_headroom_fraction": 0.9}, headers=AUTH, timeout=60
        )
        assert response.status_code == 200 and response.json()["hbm_headroom_fraction"] == 0.9
        assert ray.get(pool.controller.policy.remote()).hbm_headroom_fraction == 0.9
        budget = int(24 * MB * (1 - 0.9))
        wait_until(
            lambda: used_bytes(pool, home) <= budget and settled(pool), what="evicted to budget"
        )
        assert hbm_epoch(pool, block, home) == epoch
        assert get(api, f"/blocks/{block}")["block"]["state"] == "premium"
        # The pins of a tier must fit what its HBM offers: 2 MiB do, 3 MiB do not.
        assert requests.post(f"{api}/blocks/{second}/pin", headers=AUTH, timeout=60).ok
        refused = requests.post(f"{api}/blocks/{third}/pin", headers=AUTH, timeout=60)
        assert refused.status_code == 409
        assert str(2 * MB) in refused.json()["detail"] and home in refused.json()["detail"]
    finally:
        requests.put(api + "/policy", json={"hbm_headroom_fraction": 0.05}, headers=AUTH)
        requests.delete(f"{api}/blocks/{second}/pin", headers=AUTH, timeout=60)
    unpinned = requests.delete(f"{api}/blocks/{block}/pin", headers=AUTH, timeout=60)
    assert unpinned.status_code == 200 and unpinned.json()["pinned"] is False
    assert get(api, "/goals") == {"pins": [], "drains": []}
    goals = [e["detail"] for e in get(api, "/audit", kind="goal", block=block)["entries"]]
    assert goals[0].startswith("unpin") and goals[-1].startswith("pin: keep in HBM")
    assert "pin: resident in HBM at full precision" in goals
    policy = [e["detail"] for e in get(api, "/audit", kind="goal")["entries"] if not e["block_id"]]
    assert "policy: hbm_headroom_fraction 0.9 -> 0.05" in policy
    assert "policy: hbm_headroom_fraction 0.05 -> 0.9" in policy


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_parse_and_match_the_controller(pool, api):
    def stable() -> bool:
        nonlocal metrics, before
        before = ray.get(pool.controller.admin_overview.remote())
        metrics = scrape(api)
        after = ray.get(pool.controller.admin_overview.remote())
        return settled(pool) and (before.tiers, before.states) == (after.tiers, after.states)

    metrics: dict[str, Any] = {}
    before: Any = None
    wait_until(stable, what="a scrape between two equal overviews")
    assert metrics["weightpool_up"] == {(): 1.0}
    for t in before.tiers:
        labels = (("emulated", str(t.emulated).lower()), ("kind", t.kind))
        labels += (("node", t.node_id), ("tier", t.tier_id))
        assert metrics["weightpool_tier_used_bytes"][labels] == t.used_bytes, t.tier_id
        if t.capacity_bytes is not None:
            assert metrics["weightpool_tier_capacity_bytes"][labels] == t.capacity_bytes
    states = {dict(k)["state"]: v for k, v in metrics["weightpool_blocks"].items()}
    assert {k: v for k, v in states.items() if v} == before.states
    assert sum(states.values()) == BLOCKS
    counters = pool.status()["counters"]  # after the scrape: counters only grow
    for name, prefix, label in (
        ("weightpool_transitions_total", "transition:", "to_state"),
        ("weightpool_vetoes_total", "veto:", "rule"),
    ):
        for labels, value in metrics[name].items():
            key = prefix + dict(labels)[label]
            assert before.counters.get(key, 0) <= value <= counters.get(key, 0), key
    moved = metrics["weightpool_moved_bytes_total"]
    assert moved[(("dst", "hbm"), ("src", "host"))] == before.counters["bytes:host->hbm"] > 0
    assert set(metrics["weightpool_vetoes_total"]) == {(("rule", r),) for r in before.rules}
    for name in (
        "weightpool_lease_hits_total",
        "weightpool_lease_misses_total",
        "weightpool_stall_seconds_total",
        "weightpool_steps_total",
        "weightpool_step_seconds_total",
        "weightpool_phase_seconds_total",
    ):
        assert name in metrics, name
    hits = metrics["weightpool_lease_hits_total"][(("path", "acquire"),)]
    assert before.counters.get("lease_grants_resident", 0) == hits
    assert not any("syn/" in v for m in metrics.values() for k in m for _, v in k)


# -- drain --------------------------------------------------------------------------------------


def tier_view(api: str, tier_id: str) -> dict[str, Any]:
    return next(t for t in get(api, "/tiers")["tiers"] if t["tier_id"] == tier_id)


def held_blocks(pool, tier_id: str) -> list[str]:
    return sorted(c.block_id for c in ray.get(pool.tier(tier_id).inventory.remote()))


def test_drain_empties_a_tier_a_leased_copy_last_and_undrain_reopens_it(pool, api):
    home = home_of(pool)
    storage = next(t.tier_id for t in pool.tiers if t.kind.value == "storage")
    refused = requests.post(f"{api}/tiers/{storage}/drain", headers=AUTH, timeout=60)
    assert refused.status_code == 409 and "storage" in refused.json()["detail"]
    held = get(api, "/blocks", tier=home)["blocks"][0]["block_id"]
    with PoolClient(namespace=NS) as client:
        client.get(held)  # a lease on its copy on `home`, renewed in the background
        started = requests.post(f"{api}/tiers/{home}/drain", headers=AUTH, timeout=60)
        assert started.status_code == 200 and started.json()["draining"] is True

        def only_the_leased_copy_left() -> bool:
            progress = tier_view(api, home)["drain"]
            left = (progress["copies_left"], progress["leased_copies_left"], progress["done"])
            return left == (1, 1, False) and held_blocks(pool, home) == [held]

        wait_until(only_the_leased_copy_left, what="every unleased copy dropped")
        new_home = home_of(pool)
        assert new_home != home
        with PoolClient(namespace=NS) as other:  # a new lease is never on the draining tier
            other.get(held)
            assert other.lease_of(held).tier_id == new_home
    # The first client closed, its lease released: the last copy goes.
    wait_until(lambda: tier_view(api, home)["drain"]["done"], what="drained")
    assert held_blocks(pool, home) == [] and used_bytes(pool, home) == 0
    assert get(api, "/blocks", tier=home)["total"] == 0
    wait_until(lambda: settled(pool) and used_bytes(pool, new_home) > 0, what="re-placed")
    goals = [e["detail"] for e in get(api, "/audit", kind="goal")["entries"]]
    assert f"drain {home}: complete, no copy left" in goals
    assert f"drain {home}: model syn re-placed for {new_home}" in goals

    # The HOST tier of the old home's node: its warm copies are dropped too.
    node = next(t.node_id for t in pool.tiers if t.tier_id == home)
    host = next(t.tier_id for t in pool.tiers if t.kind.value == "host" and t.node_id == node)
    assert requests.post(f"{api}/tiers/{host}/drain", headers=AUTH, timeout=60).ok
    wait_until(lambda: tier_view(api, host)["drain"]["done"], what="host drained")
    assert held_blocks(pool, host) == []
    for tier_id in (home, host):
        stopped = requests.delete(f"{api}/tiers/{tier_id}/drain", headers=AUTH, timeout=60)
        assert stopped.status_code == 200 and stopped.json()["draining"] is False
        view = tier_view(api, tier_id)
        assert (view["draining"], view["drain"]) == (False, None)
    wait_until(lambda: settled(pool), what="settled")
    assert ray.get(pool.controller.consistency.remote()) == []


# -- how it runs: standalone (weightpool admin), as a Serve ingress, without a pool -------------


def test_the_admin_command_serves_a_running_pool_on_loopback(pool, ray_cluster, tmp_path):
    spec = tmp_path / "openapi.json"
    written = subprocess.run(
        [WEIGHTPOOL, "admin", "--openapi", str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert str(spec) in written.stdout
    assert json.loads(spec.read_text()) == openapi_spec()
    port = free_port()
    env = {**os.environ, "WEIGHTPOOL_ADMIN_TOKEN": TOKEN}
    command = [WEIGHTPOOL, "admin", "--address", ray_cluster.address]
    command += ["--namespace", NS, "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            with contextlib.suppress(requests.ConnectionError):
                return requests.get(base + "/health", timeout=10).status_code == 200
            return False

        wait_until(up, 120, "weightpool admin answering")
        assert get(base, "/health")["blocks"] == BLOCKS
        assert requests.delete(f"{base}/blocks/syn/layers.1/pin", timeout=60).status_code == 401
        unpinned = requests.delete(f"{base}/blocks/syn/layers.1/pin", headers=AUTH, timeout=60)
        assert unpinned.status_code == 200 and unpinned.json()["pinned"] is False
    finally:
        server.terminate()
        server.wait(30)


def test_the_serve_ingress_reads_its_token_from_the_replicas_environment(pool):
    from ray import serve

    from api.serve import AdminIngress

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        env = {"WEIGHTPOOL_NAMESPACE": NS, "WEIGHTPOOL_ADMIN_TOKEN": TOKEN}
        options = {"num_cpus": 0, "runtime_env": {"env_vars": env}}
        app = AdminIngress.options(ray_actor_options=options).bind()
        serve.run(app, name="weightpool-admin", route_prefix="/admin")
        base = f"http://127.0.0.1:{port}/admin"
        assert get(base, "/health")["namespace"] == NS
        assert {t["tier_id"] for t in get(base, "/tiers")["tiers"]} == {
            t.tier_id for t in pool.tiers
        }
        url = f"{base}/blocks/syn/layers.1/pin"
        assert (
            requests.post(url, headers={"Authorization": "Bearer x"}, timeout=60).status_code == 401
        )
        assert requests.post(url, headers=AUTH, timeout=60).json()["pinned"] is True
        assert requests.delete(url, headers=AUTH, timeout=60).json()["pinned"] is False
        assert "weightpool_up 1.0" in requests.get(base + "/metrics", timeout=60).text
    finally:
        serve.shutdown()
    assert get_goals_now(pool) == ([], [])


def get_goals_now(pool) -> tuple[list[Any], list[Any]]:
    return ray.get(pool.controller.admin_goals.remote())


def test_no_pool_is_503_naming_the_namespace(ray_cluster):
    with serving(create_app("t-admin-nothing-here", token=TOKEN)) as base:
        for path in ("/health", "/tiers", "/policy", "/blocks/syn/layers.0"):
            response = requests.get(base + path, timeout=60)
            assert response.status_code == 503, path
            assert "t-admin-nothing-here" in response.json()["detail"]
        assert requests.get(base + "/metrics", timeout=60).text.startswith("# HELP weightpool_up")
        assert "weightpool_up 0.0" in requests.get(base + "/metrics", timeout=60).text


# -- fuzzing the published spec -----------------------------------------------------------------


def state_of(pool, api: str) -> tuple[Any, ...]:
    """Everything an admin call could change: goals, policy, goal records, leases, homes."""
    goal_records = ray.get(pool.controller.admin_audit.remote("goal")).total
    status = pool.status()
    return (
        get(api, "/goals"),
        get(api, "/policy"),
        goal_records,
        status["leases"],
        status["models"],
    )


def test_fuzzing_without_the_token_finds_no_error_and_changes_nothing(pool, api):
    wait_until(lambda: settled(pool), what="settled")
    before = state_of(pool, api)
    seen = fuzz(api, {}, max_examples=20)
    assert len(seen) == 15 and seen["GET /blocks"] >= {200, 422}
    mutating = {k: v for k, v in seen.items() if not k.startswith("GET")}
    assert set(mutating) == {
        "PUT /policy",
        "POST /blocks/{block_id}/pin",
        "DELETE /blocks/{block_id}/pin",
        "POST /tiers/{tier_id}/drain",
        "DELETE /tiers/{tier_id}/drain",
    }
    assert all(codes == {401} for codes in mutating.values()), mutating
    assert state_of(pool, api) == before


def test_fuzzing_with_the_token_finds_no_error(pool, api):
    policy = get(api, "/policy")
    try:
        seen = fuzz(api, AUTH, max_examples=10)
    finally:
        requests.put(api + "/policy", json=policy, headers=AUTH, timeout=60)
        for pin in get(api, "/goals")["pins"]:
            requests.delete(f"{api}/blocks/{pin['block_id']}/pin", headers=AUTH, timeout=60)
    assert get(api, "/policy") == policy
    assert seen["PUT /policy"] >= {200, 422} and seen["POST /blocks/{block_id}/pin"] >= {404}
