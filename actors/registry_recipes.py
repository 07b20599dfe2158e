"""The registry's REGENERABLE blocks (``pool.regen``): their recipes checked and added, and
which of them the runtime can rebuild now, as the policy's ``regenerable`` array, and what
their shared copies cost, as its ``nbytes``. A mixin of
:class:`actors.registry.Registry` (pure Python and numpy, no Ray)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.copies import CopyEntry, CopyStatus, TierInfo, buffer_of
from pool.blocks import BlockSpec
from pool.encoding import FULL, Encoding
from pool.errors import SpecError, UnknownBlockError
from pool.regen import LowRankDelta, Tied, check_recipe, inputs_of
from pool.tiers import TierKind

if TYPE_CHECKING:
    from actors.registry_static import Static

SHARED_NBYTES = 1  # what a copy that shares its source's buffer costs, as the policy is told


class RecipeBook:
    # Fields of the registry (a dataclass; a plain class's annotations are not its fields).
    if TYPE_CHECKING:
        specs: dict[str, BlockSpec]
        copies: dict[str, dict[tuple[str, Any], CopyEntry]]
        recipes: dict[str, Tied | LowRankDelta]
        tied_by: dict[str, list[str]]
        _index: dict[str, int]
        _static: Static | None
        _regen_static: Static | None
        _regen_key: tuple[tuple[int, ...], tuple[tuple[int, int], ...]]
        _regen_array: np.ndarray
        _regen_nbytes: np.ndarray
        encodings: tuple[Encoding, ...]
        unshared_ties: list[tuple[str, str, Encoding]]
        sharing: set[str]
        tiers: dict[str, TierInfo]

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

    def tied_source_copy(self, block_id: str, tier_id: str, encoding: Encoding) -> CopyEntry | None:
        """The ready copy of tied ``block_id``'s source on ``tier_id`` at ``encoding``, where
        that tier shares copies (an emulated HBM tier does, a device one not); else None."""
        recipe = self.recipes.get(block_id)
        if not isinstance(recipe, Tied) or tier_id not in self.sharing:
            return None
        source = self.copies[recipe.source].get((tier_id, encoding))
        return source if source is not None and source.status is CopyStatus.READY else None

    def holds_own(self, block_id: str, tier_id: str, encoding: Encoding) -> bool:
        """Whether tied ``block_id`` holds a ready copy on ``tier_id`` at ``encoding`` whose
        buffer is not its source's ready copy there: bytes of its own, or a share of a source
        copy since dropped and copied in again. A re-share swaps it for the source's."""
        source = self.tied_source_copy(block_id, tier_id, encoding)
        own = self.copies[block_id].get((tier_id, encoding))
        return (
            source is not None
            and own is not None
            and own.status is CopyStatus.READY
            and buffer_of(own) != buffer_of(source)
        )

    def _regen_view(self, st: Static) -> tuple[np.ndarray, np.ndarray]:
        """The policy's ``regenerable`` and ``nbytes`` arrays as the recipes make them now.

        A block is regenerable while its recipe's input is in its home HBM tier (a tied source
        at any encoding, a base at full precision): the runtime can rebuild it there.

        A tied block costs a tier that shares copies no bytes at an encoding its source holds
        there: its copy is the source's buffer, counted once. The policy is told
        ``SHARED_NBYTES`` for it there (1: the step divides by bytes), where the block has no
        copy yet or shares that very buffer. It is told the block's own size where the block
        holds other bytes there (its own copy, made before its source landed, or a share of
        a source copy since replaced: listed in ``unshared_ties`` for the controller to
        re-share), where its copy is in flight or leaving, and while it has a copy in a host,
        CXL or peer tier (the step sizes those from the full-precision column; a regenerable
        block gets no new one). Each array is the same object while what it says is the same
        (the policy caches by identity); ``nbytes`` is the static one when nothing is shared.
        """
        rows: list[int] = []
        shared: list[tuple[int, int]] = []
        unshared: list[tuple[str, str, Encoding]] = []
        enc_index = {enc: j for j, enc in enumerate(self.encodings)}
        for block_id, recipe in self.recipes.items():
            home = self.home_of(block_id).tier_id
            tied = isinstance(recipe, Tied)
            ready = [
                c
                for c in self.copies[recipe.source if tied else recipe.base].values()
                if c.tier_id == home and c.status is CopyStatus.READY
            ]
            row = self._index[block_id]
            if ready if tied else any(c.encoding == FULL for c in ready):
                rows.append(row)
            if not tied or home not in self.sharing:
                continue
            mine = self.copies[block_id]
            elsewhere = any(
                c.tier_id != home and self.tiers[c.tier_id].kind is not TierKind.STORAGE
                for c in mine.values()
            )
            for source in ready:
                e = source.encoding
                own = mine.get((home, e))
                if own is not None and own.status is CopyStatus.READY:
                    if buffer_of(own) != buffer_of(source):
                        unshared.append((block_id, home, e))  # other bytes until re-shared
                        continue
                elif own is not None:
                    continue  # arriving or leaving: its size, whichever it holds
                if not elsewhere and e in enc_index:
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
