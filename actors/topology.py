"""Which node hosts which tier, and the tier actors' creation (used at start and on node join).

Tier actors are pinned to their node with Ray's node-affinity scheduling (``soft=False``); which
nodes host which tiers comes from the nodes' Ray resources: a node with a ``weightpool_host``
resource gets a HOST tier (every node does when no node declares one), ``weightpool_cxl`` a CXL
tier (when ``cxl_bytes`` > 0), ``GPU`` or, without GPUs, ``emulated_devices_per_node`` HBM tiers;
the STORAGE tier goes to the first node with ``weightpool_storage`` (else the driver's node).
Tier ids are stable per node, so a node that joins later gets its tiers by the same rule
(:meth:`actors.controller.PlacementController.adopt_new_nodes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.config import PoolConfig
from actors.names import tier_actor_name
from actors.registry import TierInfo
from actors.tier import TierActor
from pool.tiers import TierKind, TierSpec


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    resources: dict[str, float]
    is_driver: bool


def alive_nodes() -> list[NodeInfo]:
    here = ray.get_runtime_context().get_node_id()
    return [
        NodeInfo(n["NodeID"], dict(n["Resources"]), n["NodeID"] == here)
        for n in ray.nodes()
        if n["Alive"]
    ]


def plan_tiers(nodes: list[NodeInfo], config: PoolConfig) -> list[TierInfo]:
    """The tier instances for ``nodes`` (pure: tested without a cluster). Tier ids are
    ``<node id prefix>/<kind><index>``, stable for a node across controller restarts."""
    tiers: list[TierInfo] = []
    declared_host = any(n.resources.get("weightpool_host") for n in nodes)
    for node in sorted(nodes, key=lambda n: (not n.is_driver, n.node_id)):
        prefix = node.node_id[:8]
        gpus = int(node.resources.get("GPU", 0))
        devices = gpus or config.emulated_devices_per_node
        for d in range(devices):
            spec = TierSpec(
                tier_id=f"{prefix}/hbm{d}",
                kind=TierKind.HBM,
                capacity_bytes=config.hbm_bytes_per_device,
                node=node.node_id,
                device=d,
                emulated=gpus == 0,
            )
            tiers.append(TierInfo(spec, node.node_id))
        if node.resources.get("weightpool_host") or not declared_host:
            spec = TierSpec(
                tier_id=f"{prefix}/host",
                kind=TierKind.HOST,
                capacity_bytes=config.host_bytes,
                node=node.node_id,
            )
            tiers.append(TierInfo(spec, node.node_id))
        if config.cxl_bytes and node.resources.get("weightpool_cxl"):
            spec = TierSpec(
                tier_id=f"{prefix}/cxl",
                kind=TierKind.CXL,
                capacity_bytes=config.cxl_bytes,
                node=node.node_id,
                emulated=True,  # bound to a CPU-less NUMA node: not yet (see the README)
            )
            tiers.append(TierInfo(spec, node.node_id))
    storage_nodes = [n for n in nodes if n.resources.get("weightpool_storage")]
    home = storage_nodes[0] if storage_nodes else next(n for n in nodes if n.is_driver)
    spec = TierSpec(tier_id=f"{home.node_id[:8]}/storage", kind=TierKind.STORAGE, node=home.node_id)
    tiers.append(TierInfo(spec, home.node_id))
    return tiers


def create_tier_actor(info: TierInfo, config: PoolConfig, hbm_specs: tuple[TierSpec, ...]) -> Any:
    """The tier's named, detached actor on its node (the running one if it exists already).
    ``hbm_specs``: the HBM tiers a storage tier checks imports against."""
    storage = info.kind is TierKind.STORAGE
    return (
        ray.remote(TierActor)
        .options(
            name=tier_actor_name(info.tier_id),
            namespace=config.namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_concurrency=16,
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(info.node_id, soft=False),
        )
        .remote(
            info.spec,
            config.storage_dir if storage else None,
            hbm_specs if storage else (),
        )
    )
