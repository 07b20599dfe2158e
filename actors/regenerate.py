"""The executor's rebuild of a REGENERABLE block in its destination tier (``pool.regen``).

- A tied block shares its source's copy when the tier holds the source at the wanted encoding
  (``TierActor.alias``: no byte moved, none added); when it holds the source at full precision
  only, the tier encodes its own copy from it (``TierActor.regenerate``: no byte moved).
- A low-rank delta is merged into the base's full-precision copy in the tier, the factors pulled
  from their nearest full-precision copy.

A tied block whose source's chain is running in the same executor (the two promoted by one plan)
waits for that chain first, so that the pair shares one copy whichever thread runs first. A tied
block that holds other bytes than its source's copy (its own, made before the source landed,
or a share of a source copy since replaced) is re-shared by the controller's step: the registry's
snapshot names it (``Registry.unshared_ties``), ``recall_for_plan`` recalls kept leases on it and
bars it once free, and :func:`reshare` swaps it. A source landing wakes the step
(``Executor.commit``).
Anything else (an input not in the tier, a rebuild that fails) leaves the copy to the caller,
which moves the block's own bytes as for any block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ray

from actors.registry import CopyEntry, CopyStatus
from pool.blocks import BlockSpec
from pool.encoding import FULL, Encoding
from pool.regen import Tied, inputs_of

if TYPE_CHECKING:
    from actors.executor import Executor


def _ready(ex: Executor, block_id: str, tier_id: str, encoding: Encoding) -> CopyEntry | None:
    c = ex.ctl.registry.copy(block_id, tier_id, encoding)
    return c if c is not None and c.status is CopyStatus.READY else None


def rebuild(ex: Executor, spec: BlockSpec, dst: str, encoding: Encoding) -> bool:
    """Make ``spec``'s copy on ``dst`` at ``encoding`` from its recipe's inputs there. True once
    the copy is held (or its tier failed meanwhile); False, with nothing changed, when the block
    has no recipe, its inputs are not there, or the rebuild failed (counted, recorded)."""
    ctl, reg = ex.ctl, ex.ctl.registry
    block_id = spec.block_id
    with ctl.lock:
        recipe = reg.recipes.get(block_id)
        if recipe is None:
            return False
        delta = None
        share = False
        if isinstance(recipe, Tied):
            base_id = recipe.source
            # The source promoted by the same plan: let its chain land first (bounded).
            ctl.copies_changed.wait_for(
                lambda: base_id not in ex.busy or _ready(ex, base_id, dst, encoding) is not None,
                timeout=ctl.config.call_timeout_s,
            )
            share = _ready(ex, base_id, dst, encoding) is not None
            if not share and _ready(ex, base_id, dst, FULL) is None:
                return False
        else:
            base_id = recipe.base
            if _ready(ex, base_id, dst, FULL) is None:
                return False
            delta = _ready(ex, recipe.delta, dst, FULL)
            if delta is None:
                try:
                    delta = ex._source(recipe.delta, dst, FULL)  # lossless: full precision
                except RuntimeError:
                    return False
        epoch, checksum = ex.begin(block_id, dst, encoding)
        inputs = [reg.spec(i) for i in inputs_of(recipe)]
    moved = 0
    tier = ctl.handles[dst]
    try:
        if share:
            call = tier.alias.remote(block_id, encoding, base_id, epoch, checksum)
        else:
            sources: list[Any] = [None] * len(inputs)  # None: read from the tier itself
            if delta is not None and delta.tier_id != dst:
                moved = delta.nbytes
                export = ctl.handles[delta.tier_id].export
                sources[1] = export.remote(inputs[1], delta.encoding, FULL)
            call = tier.regenerate.remote(spec, recipe, inputs, encoding, epoch, checksum, *sources)
        entry, handle = ray.get(call, timeout=ctl.config.call_timeout_s)
    except Exception as err:
        ex.abandon(block_id, dst, encoding, epoch)
        ctl.count("regenerate_fallbacks")
        ctl.record("fault", block_id, f"not rebuilt, copied instead: {type(err).__name__}: {err}")
        return False
    if not ex.commit(entry, handle[0], epoch):
        return True  # the destination failed meanwhile; its copies were forgotten
    ctl.count("regenerations")
    ctl.count("bytes:regenerate", moved)
    how = (
        f"shares {base_id}'s copy"
        if share
        else f"encoded from {base_id}'s full copy"
        if isinstance(recipe, Tied)
        else f"{base_id} + delta"
    )
    ctl.record("execute", block_id, f"regenerated on {dst}@{encoding.name}: {how}")
    return True


def reshare(ex: Executor, block_id: str, tier_id: str, encoding: Encoding) -> None:
    """Replace a tied block's own copy by its source's (the block's chain is held busy): drop
    it unless a lease pins it, then share; if sharing fails, copy it back."""
    with ex.ctl.lock:
        c = _ready(ex, block_id, tier_id, encoding)
        spec = ex.ctl.registry.spec(block_id)
        own = ex.ctl.registry.holds_own(block_id, tier_id, encoding)
    if c is None or not own or not ex._drop(c):
        return  # gone, shared already, or leased: it stays as it is
    ex.ctl.count("reshared")
    if not rebuild(ex, spec, tier_id, encoding):
        ex._copy(spec, tier_id, encoding)
