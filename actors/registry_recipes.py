"""The registry's REGENERABLE blocks (``pool.regen``): their recipes checked and added, and
which of them the runtime can rebuild now, as the policy's ``regenerable`` array, and what
their shared copies cost, as its ``nbytes``. A mixin of
:class:`actors.registry.Registry` (pure Python and numpy, no Ray)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.copies import CopyEntry, CopyStatus, TierInfo
from pool.blocks import BlockSpec
from pool.encoding import FULL, Encoding
from pool.errors import SpecError, UnknownBlockError
from pool.regen import LowRankDelta, Tied, check_recipe, inputs_of

if TYPE_CHECKING:
    from actors.registry import _Static

SHARED_NBYTES = 1  # what a copy that shares its source's buffer costs, as the policy is told


class RecipeBook:
    # Fields of the registry (a dataclass; a plain class's annotations are not its fields).
    if TYPE_CHECKING:
        specs: dict[str, BlockSpec]
        copies: dict[str, dict[tuple[str, Any], CopyEntry]]
        recipes: dict[str, Tied | LowRankDelta]
        tied_by: dict[str, list[str]]
        _index: dict[str, int]
        _static: _Static | None
        _regen_static: _Static | None
        _regen_key: tuple[tuple[int, ...], tuple[tuple[int, int], ...]]
        _regen_array: np.ndarray
        _regen_nbytes: np.ndarray
        encodings: tuple[Encoding, ...]
        unshared_ties: list[tuple[str, str, Encoding]]

        def home_of(self, block_id: str) -> TierInfo: ...

    def check_recipes(
        self,
        recipes: Mapping[str, Tied | LowRankDelta],
        new_specs: Sequence[BlockSpec] = (),
        new_home: str = "",
    ) -> None:
        """Whether ``recipes`` can make their blocks REGENERABLE, counting ``new_specs`` (a
        model about to be registered for ``new_home``) as registered. A tied block must be
        placed for the same HBM tier as its source (that tier shares the source's copy).

        Raises:
            UnknownBlockError: a recipe is for a block that is not registered.
            SpecError: a recipe does not fit its block (see ``pool.regen.check_recipe``), or a
                tied block's model has another home than its source's.
        """
        specs = {**self.specs, **{s.block_id: s for s in new_specs}}
        new = {s.block_id for s in new_specs}

        def home(block_id: str) -> str:
            return new_home if block_id in new else self.home_of(block_id).tier_id

        combined = {**self.recipes, **recipes}

        def follow(path: list[str]) -> None:  # a rebuild must not need its own result
            for source in inputs_of(combined[path[-1]]):
                if source in path:
                    raise SpecError(f"regenerators form a cycle: {' -> '.join([*path, source])}")
                if source in combined:
                    follow([*path, source])

        for block_id in recipes:
            follow([block_id])
        for block_id, recipe in recipes.items():
            if block_id not in specs:
                raise UnknownBlockError(f"recipe for block {block_id!r}, which is not registered")
            check_recipe(specs[block_id], recipe, specs)
            if isinstance(recipe, Tied) and home(block_id) != home(recipe.source):
                raise SpecError(
                    f"block {block_id!r} is tied to {recipe.source!r}, placed for another HBM "
                    f"tier ({home(recipe.source)}); expected the same tier"
                )

    def add_recipes(self, recipes: Mapping[str, Tied | LowRankDelta]) -> None:
        """Make blocks REGENERABLE by their recipes, all or none (raises as
        :meth:`check_recipes`, nothing changed)."""
        self.check_recipes(recipes)
        self.adopt_recipes(recipes)

    def adopt_recipes(self, recipes: Mapping[str, Tied | LowRankDelta]) -> None:
        """Add recipes already checked (``check_recipes``)."""
        self.recipes.update(recipes)
        for block_id, recipe in recipes.items():
            if isinstance(recipe, Tied):
                self.tied_by.setdefault(recipe.source, []).append(block_id)
        self._static = None

    def _regen_view(self, st: _Static) -> tuple[np.ndarray, np.ndarray]:
        """The policy's ``regenerable`` and ``nbytes`` arrays as the recipes make them now.

        A block is regenerable while its recipe's input is in its home HBM tier (a tied source
        at any encoding, a base at full precision): the runtime can rebuild it there. A tied
        block costs that tier no bytes at an encoding its source holds there (the tier shares
        the source's copy and counts it once), so the policy is told ``SHARED_NBYTES`` for it
        (1: the step divides by bytes) and does not count the shared buffer twice. Such a
        block is regenerable, so the step gives it no host or CXL copy, the only other place
        it would count those bytes. A tied block that holds a copy of its own there (its
        source landed after it) counts that copy's size until it is re-shared: those copies are
        left in ``unshared_ties`` for the controller. Each array is the same object while what
        it says is the same (the policy caches by identity); ``nbytes`` is the static one when
        nothing is shared."""
        rows: list[int] = []
        shared: list[tuple[int, int]] = []
        unshared: list[tuple[str, str, Encoding]] = []
        enc_index = {enc: j for j, enc in enumerate(self.encodings)}
        for block_id, recipe in self.recipes.items():
            home = self.home_of(block_id).tier_id
            tied = isinstance(recipe, Tied)
            ready = [
                c.encoding
                for c in self.copies[recipe.source if tied else recipe.base].values()
                if c.tier_id == home and c.status is CopyStatus.READY
            ]
            row = self._index[block_id]
            if ready if tied else FULL in ready:
                rows.append(row)
            if not tied:
                continue
            for e in ready:
                own = self.copies[block_id].get((home, e))
                if own is not None and own.status is CopyStatus.READY and not own.shared_of:
                    unshared.append((block_id, home, e))  # its own bytes until re-shared
                elif e in enc_index:
                    shared.append((row, enc_index[e]))
        self.unshared_ties = unshared
        key = (tuple(sorted(rows)), tuple(sorted(shared)))
        if self._regen_static is not st or self._regen_key != key:
            regenerable = np.zeros(st.blocks.count, bool)
            regenerable[rows] = True
            nbytes = st.blocks.nbytes
            if shared:
                nbytes = nbytes.copy()
                at_row, at_encoding = zip(*shared, strict=True)
                nbytes[list(at_row), list(at_encoding)] = SHARED_NBYTES
            self._regen_static, self._regen_key = st, key
            self._regen_array, self._regen_nbytes = regenerable, nbytes
        return self._regen_array, self._regen_nbytes
