"""The controller's REGENERABLE operations (``pool.regen``): recipes checked, registered,
persisted beside the catalog (``pool-recipes.json``) and restored after a restart, and ties
declared after loading. A mixin of :class:`actors.controller.PlacementController`; the rebuilds
themselves are the executor's (``actors.regenerate``)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from actors.registry import CopyStatus, Registry
from pool.blocks import BlockSpec
from pool.errors import UnknownBlockError, WeightpoolError
from pool.regen import LowRankDelta, Tied
from pool.tiers import TierKind

if TYPE_CHECKING:
    from actors.executor import Executor


class RegenOps:
    # Provided by the controller.
    lock: threading.RLock
    registry: Registry
    executor: Executor
    wake: threading.Event

    if TYPE_CHECKING:

        def record(self, kind: str, block_id: str, detail: str) -> None: ...
        def call(self, tier_id: str, method: str, *args: Any) -> Any: ...
        def _storage_id(self) -> str: ...

    def init_recipes(self) -> None:
        """Called once by the controller's constructor, before its recovery."""
        self.recipes_saving = threading.Lock()  # one writer of pool-recipes.json at a time
        self.unrestored_recipes: dict[str, Tied | LowRankDelta] = {}

    def home_of_model(self, model: str) -> str:
        """The HBM tier ``model``'s blocks are placed for.

        Raises:
            UnknownBlockError: no such model.
        """
        with self.lock:
            if model not in self.registry.models:
                raise UnknownBlockError(
                    f"no model {model!r} in the pool; models: {list(self.registry.models)}"
                )
            return self.registry.models[model].home_hbm

    def check_recipes(
        self,
        recipes: dict[str, Tied | LowRankDelta],
        specs: list[BlockSpec],
        home_hbm: str | None,
    ) -> None:
        """What ``register_model`` checks of ``recipes`` for a model of ``specs`` to be placed
        for ``home_hbm`` (None: not chosen yet), before anything is imported.

        Raises:
            SpecError, UnknownBlockError: as ``Registry.check_recipes``.
        """
        with self.lock:
            self.registry.check_recipes(recipes, specs, home_hbm or "(not chosen yet)")

    def add_regenerators(self, recipes: dict[str, Tied | LowRankDelta]) -> int:
        """Make registered blocks REGENERABLE by ``recipes`` (all or none), persisted; a tied
        block already holding its own copy where its source's copy is shares it from the next
        step on (``recall_for_plan``: a kept lease on it is recalled first, a plain one waited
        for). Returns the number of such copies.

        Raises:
            SpecError, UnknownBlockError: as ``Registry.check_recipes`` (nothing changed).
        """
        with self.lock:
            self.registry.add_recipes(recipes)
            queued = [
                (block_id, c.tier_id, c.encoding)
                for block_id, recipe in recipes.items()
                if isinstance(recipe, Tied)
                for c in self.registry.copies_of(recipe.source)
                if c.status is CopyStatus.READY
                and self.registry.tiers[c.tier_id].kind is TierKind.HBM
                and self.registry.holds_own(block_id, c.tier_id, c.encoding)
            ]
        self.save_recipes()
        self.record("execute", "", f"regenerators added for {len(recipes)} blocks")
        self.wake.set()  # the next step re-shares them
        return len(queued)

    def save_recipes(self) -> None:
        """Write the registry's recipes (and those not restored) beside the catalog; one
        writer at a time, each writing the latest set."""
        with self.recipes_saving:
            with self.lock:
                recipes = {**self.unrestored_recipes, **self.registry.recipes}
            self.call(self._storage_id(), "save_recipes", recipes)

    def restore_recipes(self, storage: str) -> None:
        """Called once by the controller's recovery, after the models are registered: each
        persisted recipe is restored on its own; one that no longer fits is recorded and kept
        in the file (the pool serves its block by copy)."""
        try:
            recipes = self.call(storage, "load_recipes")
        except Exception as err:  # the pool serves every block by copy, as without recipes
            self.record("fault", "", f"regenerators not read: {type(err).__name__}: {err}")
            recipes = {}
        for block_id, recipe in recipes.items():
            try:
                self.registry.add_recipes({block_id: recipe})
            except WeightpoolError as err:  # served by copy; kept in the file for later
                self.unrestored_recipes[block_id] = recipe
                self.record("fault", block_id, f"regenerator not restored: {err}")
