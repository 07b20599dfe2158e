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
  blocks and copies them into their slices of a workspace (:mod:`actors.integration_binding`);
- telemetry: the time spent in each layer goes to :meth:`PoolClient.record_layer` when the next
  layer starts, which also tells the controller where the model is (its step then promotes the
  blocks that come next); each forward's batch size is reported as the model's concurrency.

Lease keeping. Leases kept in the client's cache (renewed in the background) make later uses
cache hits, but pin their HBM copies: the controller can neither evict nor re-encode them. So
the managed model keeps at most ``lease_budget_bytes`` of HBM copies leased between uses:

- when the model and the other models placed for its home HBM tier fit there at full precision
  (less the policy's headroom), the budget is unlimited: every lease is kept, and a resident
  model runs with no remote call and no accounting at all;
- otherwise (the default budget is half the room the tier has for this model: its capacity
  less the headroom and the other models placed there) each layer's blocks are leased in one
  call when the layer starts, and when the next layer starts the layer's leases are released in
  one call if the model holds more than its budget. Releasing the layer just used (not the
  oldest) is right for a cyclic schedule: its next use is the farthest away. Leases kept from
  the first layers are hits on the next forward; the rest stream through the room left, which
  the policy fills and re-encodes as it decides;
- a layer that would not fit beside the kept leases (its blocks counted at the size of their
  last leased copy, full precision before) makes the model release every other lease first, so
  that its own leases never stop it from running.

Misses: a block that is not resident in HBM makes the forward wait for its demand promotion, at
most the client's ``acquire_timeout_s``; past it the forward raises
:class:`actors.client.LeaseMissError` naming the block and its nearest copy, and every module is
left holding its placeholders (nothing half-materialized).

Concurrency: forwards through one managed model are serialized (a lock taken by the root module's
pre-hook), since they swap the modules' tensors.
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
from pool.codecs import encoded_nbytes
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
        lease_budget_bytes: HBM bytes of leased copies kept between uses (see the module
            docstring); ``None``: unlimited.
        dense: bindings of whole-tensor blocks, by block id.
        groups: the modules whose hooks put the dense blocks in place (``granularity``).
        experts: fused MoE expert bindings, by the experts module's path.
        managed_bytes: full-precision bytes of the bound blocks (freed locally).
        local_bytes: bytes of parameters and buffers the pool does not hold (kept locally).
        steps: forwards run so far (the ``step`` of router telemetry).
        pinned, pinned_bytes: with a budget, the blocks kept leased and their copies' bytes.
        leased_encoding: with a budget, the encoding of each block's latest lease.
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
        lease_budget_bytes: int | None,
    ):
        self.model = model
        self.client = client
        self.model_name = model_name
        self.dense = dense
        self.groups = groups
        self.experts = experts
        self.specs = specs
        self.lease_budget_bytes = lease_budget_bytes
        self.room_bytes: int | None = None  # HBM the model may use (manage() sets it)
        self.pinned: dict[str, int] = {}  # with a budget: block -> bytes of its leased copy
        self.pinned_bytes = 0
        self.expected = {b: s.full_nbytes for b, s in specs.items()}  # bytes of a new lease
        self.leased_encoding: dict[str, Encoding] = {}  # with a budget: of each block's lease
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
        self.handles: list[Any] = []

    # -- hooks --------------------------------------------------------------------------------

    def _root_pre(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.lock.acquire()
        self.state = _ForwardState()
        self.steps += 1
        if self.lease_budget_bytes is not None:  # forget leases the client lost (fenced)
            for block_id in [b for b in self.pinned if self.client.lease_of(b) is None]:
                self.pinned_bytes -= self.pinned.pop(block_id)
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
            self.lock.release()

    def _enter_layer(self, layer: int | None) -> None:
        """Telemetry and lease keeping at a layer boundary (``None``: the forward ended)."""
        state = self.state
        if layer == state.layer and layer is not None:
            return
        now = time.perf_counter()
        if state.layer is not None:
            self.client.record_layer(self.model_name, state.layer, now - state.layer_start_s)
            self.after_use(self.by_layer.get(state.layer, []))
        state.layer, state.layer_start_s = layer, now
        if layer is not None and self.lease_budget_bytes is not None:
            self.lease(self.by_layer.get(layer, []))

    def lease(self, block_ids: list[str]) -> None:
        """With a budget: lease those of ``block_ids`` not leased yet, in one call, and count
        their copies' bytes. Raises what :meth:`PoolClient.acquire` raises."""
        missing = [b for b in block_ids if self.client.lease_of(b) is None]
        if not missing:
            return
        need = sum(self.expected[b] for b in missing)
        if self.room_bytes is not None and self.pinned_bytes + need > self.room_bytes:
            others = [b for b in self.pinned if b not in block_ids]
            if others:
                self.client.release(others)
                for block_id in others:
                    self.pinned_bytes -= self.pinned.pop(block_id)
        self.client.acquire(missing)
        for block_id in missing:
            lease = self.client.lease_of(block_id)
            if lease is not None and block_id not in self.pinned:
                nbytes = encoded_nbytes(self.specs[block_id], lease.encoding.precision)
                self.pinned[block_id] = self.expected[block_id] = nbytes
                self.pinned_bytes += nbytes
                self.leased_encoding[block_id] = lease.encoding

    def after_use(self, block_ids: list[str]) -> None:
        """With a budget: release ``block_ids`` (just used) if the model holds more than it."""
        budget = self.lease_budget_bytes
        if budget is None or self.pinned_bytes <= budget or not block_ids:
            return
        self.client.release(block_ids)
        for block_id in block_ids:
            self.pinned_bytes -= self.pinned.pop(block_id, 0)

    def _group_pre(self, group: HookGroup) -> Any:
        client, layer, blocks, every = self.client, group.layer, group.blocks, group.slots

        def pre(_module: nn.Module, _args: tuple[Any, ...]) -> None:
            if self.state.layer != layer:
                self._enter_layer(layer)
            for block_id, slots in blocks:
                tensors = client.get(block_id)
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
    lease_budget_bytes: int | None = None,
    routers: dict[str, nn.Module] | None = None,
    granularity: str = "layer",
) -> ManagedModel:
    """Serve ``model``'s weights from the pool, where its checkpoint is registered as
    ``model_name`` (see the module docstring for what changes and when).

    Args:
        model: the torch module; changed in place (hooks, placeholders) and returned in the
            handle. Every pool block of ``model_name`` must name tensors the model has.
        client: the pool client the forwards lease through.
        prefix: prepended to the checkpoint keys to find the model's tensors (``"bert."`` for a
            checkpoint saved from ``BertModel`` loaded into ``BertForMaskedLM``).
        lease_budget_bytes: the most HBM bytes of leased copies kept between uses (0: release
            every layer after use); ``None`` decides from the model's size and its home HBM
            tier's capacity (see the module docstring).
        routers: the router module of each fused experts module, by the experts module's path;
            by default its sibling named ``gate`` or ``router``.
        granularity: ``"block"``: each dense block is put in place by its own module's hooks;
            ``"layer"``: a layer's dense blocks together, by the hooks of the smallest module
            holding them (an encoder layer), where that module holds no other layer's blocks
            and is not the root (else per block). Same leases and telemetry; far fewer hooks
            (see the README's overhead figures).

    Raises:
        UnknownBlockError: ``model_name`` is not registered in the pool.
        IntegrationError: a block names a tensor the model lacks, or one whose shape or dtype
            differs, or a fused experts module has no router, or ``granularity`` is unknown;
            the model is left unchanged.
    """
    if granularity not in ("block", "layer"):
        raise IntegrationError(f"granularity {granularity!r}; expected 'block' or 'layer'")
    home, specs, others_bytes = ray.get(client.controller.model_blocks.remote(model_name))
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
    room = _room(client, home, others_bytes)
    if lease_budget_bytes is None and room is not None:
        lease_budget_bytes = None if sum(s.full_nbytes for s in specs) <= room else room // 2
    by_id = {s.block_id: s for s in specs}
    groups = hook_groups(model, dense, granularity)
    managed = ManagedModel(
        model, client, model_name, dense, groups, experts, by_id, lease_budget_bytes
    )
    managed.room_bytes = room
    managed.install()
    return managed


def _room(client: PoolClient, home: str, others_bytes: int) -> int | None:
    """HBM the model may use on its home tier: its capacity less the policy's headroom and the
    full-precision bytes of the other models placed there (``None``: unbounded)."""
    config, tiers = ray.get(client.controller.describe.remote())
    capacity = next((t.spec.capacity_bytes for t in tiers if t.tier_id == home), None)
    if capacity is None:
        return None
    return max(int(capacity * (1.0 - config.policy.hbm_headroom_fraction)) - others_bytes, 0)


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
