"""Torch models whose weights the pool serves: :func:`manage` (DESIGN section 3, issue 6).

``manage(model, client, model_name)`` takes an unmodified torch model (transformers models
included) whose checkpoint was loaded into the pool as ``model_name``, and makes the pool the home
of its weights:

- every pool block of the model is bound to the model's parameters and buffers by its checkpoint
  keys (``prefix`` + ``TensorSpec.source``); the local tensors are replaced by ``meta``
  placeholders (shape and dtype kept, no storage), so the model holds no second copy;
- a forward pre-hook on the block's module (the smallest module holding all its tensors) puts the
  leased tensors in place just before the module runs, and a forward hook puts the placeholders
  back after: between uses the module holds no reference to pool memory. Leased tensors come from
  :meth:`PoolClient.get`: a block this client already leases is a dictionary lookup in-process
  (no remote call, no decode, no copy); a miss is one remote ``acquire``;
- fused MoE expert tensors (one parameter ``[experts, ...]`` per layer, transformers 5) are
  leased per expert: a hook on the layer's router reads its top-k choice, reports it with
  :meth:`PoolClient.record_route`, and the experts module's pre-hook leases only those experts'
  blocks and copies them into their slices of a workspace (:mod:`actors.integration_experts`);
- telemetry: the time spent in each layer goes to :meth:`PoolClient.record_layer` when the next
  layer starts, which also tells the controller where the model is (its step then promotes the
  blocks that come next); each forward's batch size is reported as the model's concurrency.

Lease keeping. With ``keep_leases`` the leases stay in the client's cache (renewed in the
background), so a resident model runs with no remote call at all; without it (streaming, for a
model larger than its HBM tier) each layer's blocks are leased in one call when the layer starts
and released in one call when the next layer starts, so that the controller may evict them.
The default keeps leases when the model and the other models placed for its home HBM tier fit
in that tier at full precision (less the policy's headroom).

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from torch import nn

from actors.client import PoolClient
from actors.integration_binding import (
    FusedExperts,
    IntegrationError,
    TensorSlot,
    bind_fused_experts,
    resolve_slots,
)
from pool.blocks import BlockSpec

__all__ = ["IntegrationError", "ManagedModel", "manage"]


@dataclass
class DenseBinding:
    """One block whose tensors are whole parameters or buffers of the model."""

    block_id: str
    layer: int
    nbytes: int
    module: nn.Module
    slots: tuple[TensorSlot, ...]


@dataclass
class _ForwardState:
    """What one forward through the managed model tracks (reset by the root pre-hook)."""

    layer: int | None = None
    layer_start_s: float = 0.0
    held_layer: list[str] = field(default_factory=list)  # streaming: leases of this layer
    materialized: list[tuple[TensorSlot, ...]] = field(default_factory=list)


class ManagedModel:
    """The handle :func:`manage` returns; the model itself is changed in place.

    Attributes:
        model: the managed torch module (call it as before).
        model_name: the pool's name of its checkpoint.
        keep_leases: whether leases stay cached between uses (see the module docstring).
        dense: bindings of whole-tensor blocks, by block id.
        experts: fused MoE expert bindings, by the experts module's path.
        managed_bytes: full-precision bytes of the bound blocks (freed locally).
        local_bytes: bytes of parameters and buffers the pool does not hold (kept locally).
        steps: forwards run so far (the ``step`` of router telemetry).
    """

    def __init__(
        self,
        model: nn.Module,
        client: PoolClient,
        model_name: str,
        dense: dict[str, DenseBinding],
        experts: dict[str, FusedExperts],
        keep_leases: bool,
    ):
        self.model = model
        self.client = client
        self.model_name = model_name
        self.dense = dense
        self.experts = experts
        self.keep_leases = keep_leases
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
        """Telemetry and streaming at a layer boundary (``None``: the forward ended)."""
        state = self.state
        if layer == state.layer and layer is not None:
            return
        now = time.perf_counter()
        if state.layer is not None:
            self.client.record_layer(self.model_name, state.layer, now - state.layer_start_s)
        if state.held_layer:
            self.client.release(state.held_layer)
            state.held_layer = []
        state.layer, state.layer_start_s = layer, now
        if layer is not None and not self.keep_leases:
            ids = self.by_layer.get(layer, [])
            missing = [b for b in ids if self.client.lease_of(b) is None]
            if missing:
                self.client.acquire(missing)
            state.held_layer = list(ids)

    def _dense_pre(self, binding: DenseBinding) -> Any:
        client, slots, block_id = self.client, binding.slots, binding.block_id

        def pre(_module: nn.Module, _args: tuple[Any, ...]) -> None:
            if self.state.layer != binding.layer:
                self._enter_layer(binding.layer)
            tensors = client.get(block_id)
            # PERF: a plain tensor in the owner's table, not a new nn.Parameter: wrapping each
            # leased tensor on every call cost ~3 us per tensor, 0.3 ms per MiniLM forward.
            for slot in slots:
                slot.table[slot.attr] = tensors[slot.tensor_name]
            self.state.materialized.append(slots)

        return pre

    def _dense_post(self, binding: DenseBinding) -> Any:
        slots = binding.slots

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
        for binding in self.dense.values():
            _put_placeholders(binding.slots)
            self.handles.append(binding.module.register_forward_pre_hook(self._dense_pre(binding)))
            self.handles.append(binding.module.register_forward_hook(self._dense_post(binding)))
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
    keep_leases: bool | None = None,
    routers: dict[str, nn.Module] | None = None,
) -> ManagedModel:
    """Serve ``model``'s weights from the pool, where its checkpoint is registered as
    ``model_name`` (see the module docstring for what changes and when).

    Args:
        model: the torch module; changed in place (hooks, placeholders) and returned in the
            handle. Every pool block of ``model_name`` must name tensors the model has.
        client: the pool client the forwards lease through.
        prefix: prepended to the checkpoint keys to find the model's tensors (``"bert."`` for a
            checkpoint saved from ``BertModel`` loaded into ``BertForMaskedLM``).
        keep_leases: keep leases between uses; ``None`` decides from the model's size and its
            home HBM tier's capacity.
        routers: the router module of each fused experts module, by the experts module's path;
            by default its sibling named ``gate`` or ``router``.

    Raises:
        UnknownBlockError: ``model_name`` is not registered in the pool.
        IntegrationError: a block names a tensor the model lacks, or one whose shape or dtype
            differs, or a fused experts module has no router; the model is left unchanged.
    """
    home, specs, others_bytes = ray.get(client.controller.model_blocks.remote(model_name))
    slots_of = resolve_slots(model, specs, prefix)  # raises before anything changes
    dense: dict[str, DenseBinding] = {}
    fused_specs: dict[str, list[BlockSpec]] = {}
    for spec in specs:
        slots = slots_of[spec.block_id]
        if any(s.fused for s in slots):
            fused_specs.setdefault(slots[0].owner_path, []).append(spec)
        else:
            module = model.get_submodule(_common_path(s.owner_path for s in slots))
            dense[spec.block_id] = DenseBinding(
                spec.block_id, spec.layer, spec.full_nbytes, module, slots
            )
    experts = bind_fused_experts(model, fused_specs, slots_of, routers or {})
    if keep_leases is None:
        keep_leases = _fits_home(client, home, sum(s.full_nbytes for s in specs) + others_bytes)
    managed = ManagedModel(model, client, model_name, dense, experts, keep_leases)
    managed.install()
    return managed


def _fits_home(client: PoolClient, home: str, nbytes: int) -> bool:
    """Whether ``nbytes`` (this model and the others placed for its home tier, all at full
    precision) fit in the home HBM tier less the policy's headroom."""
    config, tiers = ray.get(client.controller.describe.remote())
    capacity = next((t.spec.capacity_bytes for t in tiers if t.tier_id == home), None)
    if capacity is None:
        return True
    return nbytes <= capacity * (1.0 - config.policy.hbm_headroom_fraction)


def _common_path(paths: Iterable[str]) -> str:
    """The deepest module path containing every one of ``paths`` ("" is the root)."""
    split = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return ".".join(common)


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
