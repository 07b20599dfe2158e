"""The embed app (api/serve.py) on the real Ray cluster: Serve replicas run MiniLM through the pool.

The app is deployed with ``serve.run`` behind its HTTP ingress; requests are real HTTP calls. Its
two EmbedModel replicas find the pool's actors by name from Serve's namespace and lease every
block through their own clients. Then the HBM tier the replicas lease from is killed (Ray
restarts it, empty): the replicas' leases are fenced, they lease again from the copies the
controller promotes anew, and their answers stay bit-exact.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
import ray
import torch

from api.serve import build_embed_app
from pool.reference_model import embed, load_minilm
from tests.ray.helpers import make_pool, settled, teardown, wait_until

MB = 1 << 20
NAMESPACE = "t-serve"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy in plants.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def deployed(ray_cluster, tmp_path_factory, minilm_path):
    from ray import serve

    pool = make_pool(NAMESPACE, tmp_path_factory.mktemp("serve"), hbm_bytes_per_device=128 * MB)
    home = pool.load_checkpoint(minilm_path, "minilm")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_embed_app(NAMESPACE, "minilm", ray_actor_options={"num_cpus": 0})
    serve.run(app, name="embed", route_prefix="/embed")
    yield pool, home, f"http://127.0.0.1:{port}/embed/"
    serve.shutdown()
    teardown(NAMESPACE)


@pytest.fixture(scope="module")
def want(minilm_path):
    model, tokenizer = load_minilm(minilm_path)
    return embed(model, tokenizer, TEXTS)


def ask(url: str) -> torch.Tensor:
    status, body = post(url, {"texts": TEXTS})
    assert status == 200, body
    assert body["model"] == "minilm"
    return torch.tensor(body["embeddings"], dtype=torch.float32)


def test_replicas_answer_with_the_unmanaged_models_embeddings(deployed, want):
    pool, _, url = deployed
    for _ in range(4):  # both replicas, most likely
        assert torch.equal(ask(url), want)
    holders = {r.detail.split(" to ")[1].split(" on ")[0] for r in lease_records(pool)}
    assert holders and all(h.startswith("serve-") for h in holders)
    status, body = post(url, {"texts": []})
    assert status == 422 and "texts" in json.dumps(body)
    status, _ = post(url, {"texts": ["a"], "extra": 1})
    assert status == 422


def lease_records(pool):
    return ray.get(pool.controller.audit.remote(kind="lease", limit=10_000))


def test_replicas_keep_answering_across_a_tier_restart(deployed, want):
    pool, home, url = deployed
    assert torch.equal(ask(url), want)
    before = pool.status()["counters"]
    ray.kill(pool.tier(home), no_restart=False)  # Ray restarts it, empty
    wait_until(
        lambda: pool.status()["counters"].get("lease_fenced", 0) > before.get("lease_fenced", 0),
        what="the replicas' leases on the killed tier fenced",
    )
    for _ in range(4):
        assert torch.equal(ask(url), want)
    faults = ray.get(pool.controller.audit.remote(kind="fault"))
    assert any(home in r.detail for r in faults)
    after = pool.status()["counters"]
    granted = sum(after.get(k, 0) for k in ("lease_grants_resident", "lease_grants_after_miss"))
    granted_before = sum(
        before.get(k, 0) for k in ("lease_grants_resident", "lease_grants_after_miss")
    )
    assert granted > granted_before  # the replicas leased again from the new copies
    wait_until(lambda: settled(pool), what="settled")
    assert ray.get(pool.controller.consistency.remote()) == []
