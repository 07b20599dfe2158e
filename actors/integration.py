"""Torch models whose weights the pool serves: :func:`manage` (DESIGN section 3, issue 6).

``manage(model, client, model_name)`` takes an unmodified torch model (transformers models
included) whose checkpoint was loaded into the pool as ``model_name``, and makes the pool the home
of its weights:

- every pool block of the model is bound to the model's parameters and buffers by its checkpoint
  keys (``prefix`` + ``TensorSpec.source``); the local tensors are replaced by ``meta``
  placeholders (shape and dtype kept, no storage), so the model holds no second copy;
- a forward pre-hook puts the leased tensors in place just before their module runs, and a
  forward hook puts the placeholders back after: between uses the model holds no reference to
  pool memory. The module is, by default (``granularity="layer"``), the smallest one holding all
  of a layer's blocks (an encoder layer: one hook pair per layer, not per linear), else the
  block's own (the smallest module holding its tensors). Leased tensors come from
  :meth:`PoolClient.get`: a block this client already leases is a dictionary lookup in-process
  (no remote call, no decode, no copy); a miss is one remote ``acquire``;
- fused MoE expert tensors (one parameter ``[experts, ...]`` per layer, transformers 5) are
  leased per expert: a hook on the layer's router reads its top-k choice, reports it with
  :meth:`PoolClient.record_route`, and the experts module's pre-hook leases only those experts'
  blocks. By default (``experts_implementation="eager"``) ``manage`` switches a transformers
  model to its eager experts loop, which reads each routed expert's leased tensor in place;
  with any other implementation (``experts_implementation=None`` keeps the model's own, e.g.
  ``grouped_mm``) the chosen experts are copied into a workspace on every call
  (:mod:`actors.integration_binding`);
- telemetry: the time spent in each layer goes to :meth:`PoolClient.record_layer` when the next
  layer starts, which also tells the controller where the model is (its step then promotes the
  blocks that come next); each forward's batch size is reported as the model's concurrency.

Lease keeping. Every lease is kept until the controller recalls it (recallable leases,
:mod:`actors.leases`): when a layer starts, those of its blocks not leased yet are leased in one
call, and the leases stay in the client's cache (renewed in the background), so every later use
of a block still resident is a cache hit with no remote call. The policy does not see kept
leases as pins: when it wants a kept copy evicted or re-encoded, the controller recalls the
lease, and the model releases it at its next safe point, where no module holds the block's
tensors:

- at every layer boundary (every recalled lease of this model but the entering layer's blocks
  and those of the modules still running; other models sharing the client release theirs at
  their own safe points);
- while a layer's acquire waits for a promotion (the same blocks kept), so that the model's own
  kept leases never stop the promotion it waits for;
- when the forward ends, and at once between forwards (the client's background thread).

Only then does the copy move; the next use of the block leases it wherever the policy put it.

Misses: a block that is not resident in HBM makes the forward wait for its demand promotion, at
most the client's ``acquire_timeout_s``; past it the forward raises
:class:`actors.client.LeaseMissError` naming the block and its nearest copy, and every module is
left holding its placeholders (nothing half-materialized).

Concurrency: forwards through one managed model are serialized (a lock taken by the root module's
pre-hook), since they swap the modules' tensors. A forward is a use of the client
(:meth:`PoolClient.using`): recalled leases wait for the safe points above.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from torch import nn

from actors.client import PoolClient
from actors.integration_binding import (
    DenseBinding,
    FusedExperts,
    HookGroup,
    IntegrationError,
    TensorSlot,
    bind_fused_experts,
    common_path,
    hook_groups,
    resolve_slots,
)
from pool.blocks import BlockSpec
from pool.encoding import Encoding

__all__ = ["IntegrationError", "ManagedModel", "manage"]


@dataclass
class _ForwardState:
    """What one forward through the managed model tracks (reset by the root pre-hook)."""

    layer: int | None = None
    layer_start_s: float = 0.0
    materialized: list[tuple[TensorSlot, ...]] = field(default_factory=list)


class ManagedModel:
    """The handle :func:`manage` returns; the model itself is changed in place.

    Attributes:
        model: the managed torch module (call it as before).
        model_name: the pool's name of its checkpoint.
        dense: bindings of whole-tensor blocks, by block id.
        groups: the modules whose hooks put the dense blocks in place (``granularity``).
        experts: fused MoE expert bindings, by the experts module's path.
        managed_bytes: full-precision bytes of the bound blocks (freed locally).
        local_bytes: bytes of parameters and buffers the pool does not hold (kept locally).
        steps: forwards run so far (the ``step`` of router telemetry).
        leased_encoding: the encoding of each block's latest lease.
    """

    def __init__(
        self,
        model: nn.Module,
        client: PoolClient,
        model_name: str,
        dense: dict[str, DenseBinding],
        groups: list[HookGroup],
        experts: dict[str, FusedExperts],
        specs: dict[str, BlockSpec],
    ):
        self.model = model
        self.client = client
        self.model_name = model_name
        self.dense = dense
        self.groups = groups
        self.experts = experts
        self.specs = specs
        self.leased_encoding: dict[str, Encoding] = {}  # of each block's latest lease
        self.managed_bytes = sum(b.nbytes for b in dense.values()) + sum(
            e.nbytes for e in experts.values()
        )
        self.local_bytes = 0  # set by install()
        self.steps = 0
        self.lock = threading.RLock()
        self.state = _ForwardState()
        self.by_layer: dict[int, list[str]] = {}
        for binding in dense.values():
            self.by_layer.setdefault(binding.layer, []).append(binding.block_id)
        # The blocks behind each materialized slot tuple: a dense group's; an experts module
        # running on views sets its routed experts' at each call (one on a workspace holds no
        # leased tensor: the experts were copied).
        self.blocks_of_slots = {id(g.slots): tuple(b for b, _ in g.blocks) for g in groups}
        self.own = set(specs)  # this model's blocks: the only ones its safe points release
        self.handles: list[Any] = []

    # -- hooks --------------------------------------------------------------------------------

    def _root_pre(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.lock.acquire()
        self.state = _ForwardState()
        self.steps += 1
        self.client.hold()  # recalled leases wait for this forward's safe points
        batch = _batch_size(args, kwargs)
        if batch is not None:
            self.client.set_concurrency(self.model_name, batch)

    def _root_post(self, *_: Any) -> None:
        """Runs after every forward, also one that raised (``always_call``)."""
        try:
            state = self.state
            for slots in state.materialized:  # only after an error: hooks that did not run
                _put_placeholders(slots)
            state.materialized.clear()
            self._enter_layer(None)
        finally:
            try:
                self.client.unhold()  # the forward's end: recalled leases are released
            finally:
                self.lock.release()

    def _enter_layer(self, layer: int | None) -> None:
        """Telemetry and lease keeping at a layer boundary (``None``: the forward ended)."""
        state = self.state
        if layer == state.layer and layer is not None:
            return
        now = time.perf_counter()
        if state.layer is not None:
            self.client.record_layer(self.model_name, state.layer, now - state.layer_start_s)
        state.layer, state.layer_start_s = layer, now
        if layer is not None:
            self.lease(self.by_layer.get(layer, []))

    def lease(self, block_ids: list[str]) -> None:
        """A safe point before ``block_ids`` are used: release the recalled leases of every
        other block not in use, then lease those of ``block_ids`` not leased yet, in one call
        (recallable: kept until recalled). Raises what :meth:`PoolClient.acquire` raises."""
        client = self.client
        if client.recalled:
            client.release_recalled(self.in_use(block_ids))
        missing = [b for b in block_ids if client.lease_of(b) is None]
        if not missing:
            return
        client.acquire(missing, recallable=True, in_use=self.in_use(block_ids))
        for block_id in missing:
            lease = client.lease_of(block_id)
            if lease is not None:
                self.leased_encoding[block_id] = lease.encoding

    def in_use(self, block_ids: list[str]) -> set[str]:
        """What this model's safe point must not release: ``block_ids``, the blocks whose
        tensors a running module holds now, and every block of other models sharing the
        client (their own safe points release them)."""
        held = set(block_ids)
        held.update(b for b in list(self.client.cache) if b not in self.own)
        for slots in self.state.materialized:
            held.update(self.blocks_of_slots.get(id(slots), ()))
        return held

    def _group_pre(self, group: HookGroup) -> Any:
        client, layer, blocks, every = self.client, group.layer, group.blocks, group.slots

        def pre(_module: nn.Module, _args: tuple[Any, ...]) -> None:
            if self.state.layer != layer:
                self._enter_layer(layer)
            for block_id, slots in blocks:
                tensors = client.get(block_id, True)  # recallable when it must re-acquire
                # PERF: a plain tensor in the owner's table, not a new nn.Parameter: wrapping
                # each leased tensor on every call cost ~3 us a tensor, 0.3 ms a MiniLM forward.
                for slot in slots:
                    slot.table[slot.attr] = tensors[slot.tensor_name]
            self.state.materialized.append(every)

        return pre

    def _group_post(self, group: HookGroup) -> Any:
        slots = group.slots

        def post(_module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
            _put_placeholders(slots)
            held = self.state.materialized
            if held and held[-1] is slots:
                held.pop()
            else:
                _remove(held, slots)

        return post

    # -- lifecycle ----------------------------------------------------------------------------

    def install(self) -> None:
        """Replace the local tensors by placeholders and register the hooks (once)."""
        model = self.model
        self.handles.append(model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._root_post, always_call=True))
        for group in self.groups:
            _put_placeholders(group.slots)
            self.handles.append(group.module.register_forward_pre_hook(self._group_pre(group)))
            self.handles.append(group.module.register_forward_hook(self._group_post(group)))
        for fused in self.experts.values():
            self.handles.extend(fused.install(self))
        self.local_bytes = sum(
            t.numel() * t.element_size()
            for t in (*model.parameters(), *model.buffers())
            if not t.is_meta
        )

    def leased_blocks(self) -> list[str]:
        """Blocks of this model the client holds a lease on now."""
        ids = list(self.dense) + [b for f in self.experts.values() for b in f.block_ids.values()]
        return [b for b in ids if self.client.lease_of(b) is not None]

    def remove(self) -> None:
        """Remove the hooks and release this model's leases. The model keeps its placeholders:
        it cannot run again unless managed again (its weights live in the pool)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        held = self.leased_blocks()
        if held:
            self.client.release(held)

    def idle(self) -> None:
        """Report that no sequence runs on the model now (concurrency 0 for the policy)."""
        self.client.set_concurrency(self.model_name, 0)


def manage(
    model: nn.Module,
    client: PoolClient,
    model_name: str,
    *,
    prefix: str = "",
    routers: dict[str, nn.Module] | None = None,
    granularity: str = "layer",
    experts_implementation: str | None = "eager",
) -> ManagedModel:
    """Serve ``model``'s weights from the pool, where its checkpoint is registered as
    ``model_name`` (see the module docstring for what changes and when).

    Args:
        model: the torch module; changed in place (hooks, placeholders) and returned in the
            handle. Every pool block of ``model_name`` must name tensors the model has.
        client: the pool client the forwards lease through.
        prefix: prepended to the checkpoint keys to find the model's tensors (``"bert."`` for a
            checkpoint saved from ``BertModel`` loaded into ``BertForMaskedLM``).
        routers: the router module of each fused experts module, by the experts module's path;
            by default its sibling named ``gate`` or ``router``.
        granularity: ``"block"``: each dense block is put in place by its own module's hooks;
            ``"layer"``: a layer's dense blocks together, by the hooks of the smallest module
            holding them (an encoder layer), where that module holds no other layer's blocks
            and is not the root (else per block). Same leases and telemetry; far fewer hooks
            (see the README's overhead figures).
        experts_implementation: for a model with fused experts that has transformers'
            ``set_experts_implementation``, the implementation to switch it to. ``"eager"``
            (the default): the per-expert loop, which reads each routed expert's leased tensor
            in place (no copy); ``None``: keep the model's own; an implementation that needs
            every expert in one tensor (``grouped_mm``, ``batched_mm``) runs on a workspace
            into which each call copies its routed experts.

    Raises:
        UnknownBlockError: ``model_name`` is not registered in the pool.
        IntegrationError: a block names a tensor the model lacks, or one whose shape or dtype
            differs, or a fused experts module has no router, or ``granularity`` is unknown;
            the model is left unchanged.
    """
    if granularity not in ("block", "layer"):
        raise IntegrationError(f"granularity {granularity!r}; expected 'block' or 'layer'")
    _home, specs, _others = ray.get(client.controller.model_blocks.remote(model_name))
    slots_of = resolve_slots(model, specs, prefix)  # raises before anything changes
    dense: dict[str, DenseBinding] = {}
    fused_specs: dict[str, list[BlockSpec]] = {}
    for spec in specs:
        slots = slots_of[spec.block_id]
        if any(s.fused for s in slots):
            fused_specs.setdefault(slots[0].owner_path, []).append(spec)
        else:
            path = common_path(s.owner_path for s in slots)
            dense[spec.block_id] = DenseBinding(
                spec.block_id, spec.layer, spec.full_nbytes, path, slots
            )
    experts = bind_fused_experts(model, fused_specs, slots_of, routers or {})
    switch = getattr(model, "set_experts_implementation", None)
    if experts and experts_implementation is not None and callable(switch):
        switch(experts_implementation)
    by_id = {s.block_id: s for s in specs}
    groups = hook_groups(model, dense, granularity)
    managed = ManagedModel(model, client, model_name, dense, groups, experts, by_id)
    managed.install()
    return managed


def _put_placeholders(slots: tuple[TensorSlot, ...]) -> None:
    for slot in slots:
        slot.table[slot.attr] = slot.placeholder


def _remove(held: list[tuple[TensorSlot, ...]], slots: tuple[TensorSlot, ...]) -> None:
    for i in range(len(held) - 1, -1, -1):
        if held[i] is slots:
            del held[i]
            return


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None
