"""Start, find and stop a pool on a Ray cluster: tier actors on every node, one controller.

Which node hosts which tier is :mod:`actors.topology`'s rule. Every actor is named and detached in
the pool's namespace, so Ray Serve replicas (in Serve's own namespace) and a restarted controller
find them by name; nodes that join later get their tiers from the controller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.config import PoolConfig
from actors.controller import PlacementController
from actors.names import CONTROLLER_NAME, tier_actor_name
from actors.registry import TierInfo
from actors.topology import alive_nodes, create_tier_actor, plan_tiers
from pool.blocks import BlockSpec
from pool.codecs import DEFAULT_OPTIONS
from pool.encoding import FULL, Encoding, Precision
from pool.errors import UnknownBlockError
from pool.importer import CheckpointSource, SafetensorsSource, StateDictSource, plan_blocks
from pool.regen import LowRankDelta, Tied, adapter_state, tied_recipes
from pool.store import check_fits
from pool.tiers import TierKind


class Pool:
    """A driver-side handle on a running pool: its controller and its tier actors."""

    def __init__(self, config: PoolConfig, controller: Any, tiers: list[TierInfo]):
        self.config = config
        self.controller = controller
        self.tiers = tiers

    def tier(self, tier_id: str) -> Any:
        return ray.get_actor(tier_actor_name(tier_id), namespace=self.config.namespace)

    def storage(self) -> Any:
        (info,) = [t for t in self.tiers if t.kind is TierKind.STORAGE]
        return self.tier(info.tier_id)

    def load_checkpoint(
        self,
        path: str | Path,
        model: str,
        home: str | None = None,
        encodings: tuple[Encoding, ...] = (FULL,),
        progress: Callable[[int, int], None] | None = None,
        calibration: Any = None,
    ) -> str:
        """Import a safetensors checkpoint into storage and register it; returns its home tier.
        A bad ``model``, ``home`` or ``calibration`` is refused before anything is imported.
        ``progress(done, total)`` is called in this process as blocks are written (polled, a few
        times a second).

        ``calibration`` (a ``pool.calibration.CalibrationResult`` of this checkpoint under any
        model name: blocks are matched by module path) sets the blocks' sensitivities and floors
        in the catalog before they are registered, so the veto applies them from the first step.
        The checkpoint must then be readable here too (it is planned here to check them)."""
        planned = None if calibration is None else SafetensorsSource(path)
        return self._load(
            "import_checkpoint", str(path), model, home, encodings, progress, calibration, planned
        )

    def load_state_dict(
        self,
        state_dict: dict[str, Any],
        model: str,
        home: str | None = None,
        encodings: tuple[Encoding, ...] = (FULL,),
        calibration: Any = None,
        regenerators: Mapping[str, Tied | LowRankDelta] | None = None,
        tie: bool = True,
    ) -> str:
        """Import a state dict into storage and register it; returns its home tier
        (``calibration`` as for :meth:`load_checkpoint`).

        With ``tie``, a block whose tensors share storage with an earlier block's (tied
        weights, as ``module.state_dict()`` gives them) is REGENERABLE, :class:`Tied` to it:
        the HBM tier shares the source's copy instead of holding a second one. ``regenerators``
        (block id -> recipe) adds recipes of its own, checked with the blocks before anything
        is registered."""
        planned = None if calibration is None else StateDictSource(state_dict)
        recipes: dict[str, Tied | LowRankDelta] = {}
        if tie or regenerators:
            specs = plan_blocks(StateDictSource(state_dict), model)
            if tie:
                recipes.update(tied_recipes(specs, state_dict))
            recipes.update(regenerators or {})
            if recipes:  # checked before anything is imported
                ray.get(self.controller.check_recipes.remote(recipes, specs, home))
        return self._load(
            "import_state_dict",
            state_dict,
            model,
            home,
            encodings,
            None,
            calibration,
            planned,
            recipes,
        )

    def add_regenerators(self, recipes: Mapping[str, Tied | LowRankDelta]) -> int:
        """Make registered blocks REGENERABLE (block id -> recipe), e.g. ties declared after
        loading; see ``PlacementController.add_regenerators``. Returns the copies queued to be
        shared."""
        return int(ray.get(self.controller.add_regenerators.remote(dict(recipes))))

    def load_adapter(
        self,
        base: str,
        base_state_dict: Mapping[str, torch.Tensor],
        model: str,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        scale: float = 1.0,
    ) -> str:
        """Register ``model``: the model ``base`` (registered from ``base_state_dict``) with a
        low-rank delta merged into some of its tensors, as a LoRA adapter is (``W + scale * up
        @ down``; ``factors`` maps a tensor's key, e.g. ``"layers.0.q_proj.weight"``, to ``(up
        [out, rank], down [rank, in])``). Each adapted block is REGENERABLE by
        :class:`LowRankDelta` (rebuilt in HBM from the base's copy there and the factors, which
        are blocks of their own, ``<module path>.delta``); every other block is :class:`Tied` to
        the base's (it shares the base's copy). Placed for the base's HBM tier. Storage keeps
        every block's copy, as for any model; the unchanged blocks name the base's files (equal
        bytes are stored once). Returns the home tier.

        Raises:
            SpecError: a factor key is not a matrix of the base, or factors of the wrong shape.
            UnknownBlockError: ``base`` is not registered.
        """
        bases = plan_blocks(StateDictSource(dict(base_state_dict)), base)
        state, recipes = adapter_state(bases, base_state_dict, model, factors, scale)
        home = str(ray.get(self.controller.home_of_model.remote(base)))
        return self.load_state_dict(state, model, home, regenerators=recipes, tie=False)

    def _load(
        self,
        method: str,
        source: Any,
        model: str,
        home: str | None,
        encodings: tuple[Encoding, ...],
        progress: Callable[[int, int], None] | None = None,
        calibration: Any = None,
        planned: CheckpointSource | None = None,
        recipes: dict[str, Tied | LowRankDelta] | None = None,
    ) -> str:
        ray.get(self.controller.check_new_model.remote(model, home))
        quality = None
        if calibration is not None and planned is not None:
            quality = quality_updates(calibration, plan_blocks(planned, model), self.tiers)
        storage = self.storage()
        ref = getattr(storage, method).remote(source, model, encodings)
        while progress is not None and not ray.wait([ref], timeout=0.25)[0]:
            state = ray.get(storage.import_progress.remote())
            if state is not None and state[0] == model:
                progress(state[1], state[2])
        specs = ray.get(ref)
        if progress is not None:
            progress(len(specs), len(specs))
        if quality:
            by_id = {s.block_id: s for s in ray.get(storage.update_quality.remote(quality))}
            specs = [by_id.get(s.block_id, s) for s in specs]
        return str(ray.get(self.controller.register_model.remote(model, specs, home, recipes)))

    def status(self) -> dict[str, Any]:
        return dict(ray.get(self.controller.status.remote()))


def quality_updates(
    calibration: Any, planned: list[BlockSpec], tiers: list[TierInfo]
) -> dict[str, tuple[dict[Precision, float], Precision]]:
    """The catalog updates giving ``planned`` blocks ``calibration``'s sensitivities and floors,
    matched by module path (the block id less its model name).

    Raises:
        UnknownBlockError: the calibration names a block the checkpoint does not have.
        SpecError: a sensitivity out of contract; CapacityError: a floor no HBM tier can hold.
    """
    by_path = {s.block_id.split("/", 1)[1]: s for s in planned}
    path_of = {b.block_id: b.block_id.split("/", 1)[1] for b in calibration.blocks}
    unknown = sorted(b for b, path in path_of.items() if path not in by_path)
    if unknown:
        raise UnknownBlockError(
            f"calibration of model {calibration.model!r} names blocks {unknown[:3]} (of "
            f"{len(unknown)}) that this checkpoint does not have; expected a calibration of it"
        )
    updates: dict[str, tuple[dict[Precision, float], Precision]] = {}
    for block in calibration.blocks:
        spec = by_path[path_of[block.block_id]]
        updates[spec.block_id] = (dict(block.sensitivity), block.floor)
    new_specs = [
        replace(by_path[b.split("/", 1)[1]], sensitivity=u[0], floor=u[1])
        for b, u in updates.items()
    ]
    check_fits(new_specs, [t.spec for t in tiers], DEFAULT_OPTIONS)
    return updates


def start_pool(config: PoolConfig | None = None) -> Pool:
    """Create the tier actors and the controller on the connected Ray cluster (``ray.init``
    first). An existing pool in the same namespace is reused (idempotent)."""
    config = config or PoolConfig()
    try:
        return connect(config.namespace)
    except ValueError:
        pass
    tiers = plan_tiers(alive_nodes(), config)
    config = config.model_copy(update={"storage_dir": str(Path(config.storage_dir).resolve())})
    hbm_specs = tuple(t.spec for t in tiers if t.kind is TierKind.HBM)
    handles = [create_tier_actor(info, config, hbm_specs) for info in tiers]
    ray.get([h.ping.remote() for h in handles])
    (storage,) = [t for t in tiers if t.kind is TierKind.STORAGE]
    controller = (
        ray.remote(PlacementController)
        .options(
            name=CONTROLLER_NAME,
            namespace=config.namespace,
            lifetime="detached",
            max_restarts=-1,
            max_task_retries=-1,
            max_concurrency=64,
            num_cpus=0,
            # Beside the storage tier, whose node holds the pool's durable state; elsewhere
            # if that node is gone (a restart then finds the dead nodes' tiers missing).
            scheduling_strategy=NodeAffinitySchedulingStrategy(storage.node_id, soft=True),
        )
        .remote(config, tiers)
    )
    ray.get(controller.status.remote())
    return Pool(config, controller, tiers)


def connect(namespace: str = "weightpool") -> Pool:
    """The running pool in ``namespace``.

    Raises:
        ValueError: no pool runs there (Ray's own error for an unknown actor name).
    """
    controller = ray.get_actor(CONTROLLER_NAME, namespace=namespace)
    config, tiers = ray.get(controller.describe.remote())
    return Pool(config, controller, tiers)


def stop_pool(namespace: str = "weightpool") -> None:
    """Kill the pool's actors (their memory tiers' copies go with them; storage stays)."""
    try:
        pool = connect(namespace)
    except ValueError:
        return
    ray.get(pool.controller.stop.remote())
    for info in pool.tiers:
        with contextlib.suppress(ValueError):
            ray.kill(pool.tier(info.tier_id), no_restart=True)
    ray.kill(pool.controller, no_restart=True)
