"""How pool blocks bind to a torch model's tensors, and fused MoE experts leased per expert.

Part of :mod:`actors.integration` (see its docstring for the contract of ``manage``). Here:

- :func:`resolve_slots`: each block tensor's place in the model (the owner module's parameter or
  buffer table and the attribute name), checked against the pool's spec before anything changes;
- :func:`hook_groups`: which module's hooks put which dense blocks in place (a block's own
  module, or a whole layer's smallest enclosing module);
- :class:`FusedExperts`: a transformers 5 experts module whose parameters hold every expert of a
  layer (``gate_up_proj[experts, ...]``). Its router's forward hook reads the top-k choice; the
  experts' pre-hook leases only the chosen experts' blocks and puts them in place in one of two
  ways:

  - *views* (the module runs transformers' ``eager`` experts loop, which reads
    ``gate_up_proj[expert]`` for each routed expert only): each fused parameter is replaced,
    while the module runs, by an :class:`ExpertViews` whose ``[expert]`` is that expert's leased
    tensor itself: no copy, no workspace;
  - *workspace* (any other experts implementation, e.g. ``grouped_mm``, which needs every expert
    in one tensor): each chosen expert is copied into its slice of a workspace, which stands in
    for the fused parameters while the module runs. The workspace is shared by every experts
    module of the same shapes (one layer's worth of memory for the whole model); slices of
    experts not chosen hold stale values that no token is routed to. The copies are the cost:
    every layer copies its chosen experts on every forward (on the main job's MoE model, a
    third of a managed request's time on this CPU).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pool.blocks import BlockSpec
from pool.codecs._common import dtype_name
from pool.errors import WeightpoolError

ROUTER_NAMES = ("gate", "router")


class IntegrationError(WeightpoolError, ValueError):
    """A model and its pool blocks do not fit together, or a managed forward cannot proceed."""


@dataclass(frozen=True, eq=False)
class TensorSlot:
    """Where one tensor of a block lives in the model.

    Attributes:
        owner_path: the module owning the tensor ("" for the root).
        table: that module's ``_parameters`` or ``_buffers`` dict (written directly on the hot
            path: a plain dict store, no ``nn.Module.__setattr__`` checks).
        attr: the tensor's attribute name on the owner.
        tensor_name: its name inside the block (the key of the leased tensors).
        placeholder: a ``meta`` tensor of the local shape and dtype, kept between uses.
        source_index: for a fused expert tensor, the expert's index along dimension 0.
    """

    owner_path: str
    table: dict[str, Any]
    attr: str
    tensor_name: str
    placeholder: torch.Tensor
    source_index: int | None = None

    @property
    def fused(self) -> bool:
        return self.source_index is not None


def resolve_slots(
    model: nn.Module, specs: Sequence[BlockSpec], prefix: str = ""
) -> dict[str, tuple[TensorSlot, ...]]:
    """Bind every tensor of ``specs`` to the model tensor named ``prefix + source``.

    Pure lookup: the model is not changed. Tensors sharing an owner and attribute (the experts of
    one fused parameter) share one placeholder.

    Raises:
        IntegrationError: a tensor is missing from the model, or its shape or dtype differs from
            the spec's (the message names the block, the model tensor and both values).
    """
    problems: list[str] = []
    placeholders: dict[tuple[str, str], torch.Tensor] = {}
    out: dict[str, tuple[TensorSlot, ...]] = {}
    for spec in specs:
        slots = []
        for ts in spec.tensors:
            key = prefix + ts.source
            owner_path, _, attr = key.rpartition(".")
            where = f"block {spec.block_id!r}, tensor {ts.name!r} (model tensor {key!r})"
            try:
                owner = model.get_submodule(owner_path)
            except AttributeError:
                problems.append(f"{where}: the model has no module {owner_path!r}")
                continue
            if owner._parameters.get(attr) is not None:
                table: dict[str, Any] = owner._parameters
            elif owner._buffers.get(attr) is not None:
                table = owner._buffers
            else:
                problems.append(f"{where}: {owner_path or 'the root'} has no parameter or buffer")
                continue
            local = table[attr]
            shape = tuple(local.shape)
            expected = ts.shape if ts.source_index is None else (shape[0], *ts.shape)
            if shape != expected or (
                ts.source_index is not None and not 0 <= ts.source_index < shape[0]
            ):
                problems.append(f"{where}: shape {shape} in the model; expected {expected}")
                continue
            if dtype_name(local.dtype) != ts.dtype:
                problems.append(
                    f"{where}: dtype {dtype_name(local.dtype)} in the model; expected {ts.dtype}"
                )
                continue
            placeholder = placeholders.get((owner_path, attr))
            if placeholder is None:
                placeholder = torch.empty(shape, dtype=local.dtype, device="meta")
                if isinstance(local, nn.Parameter):
                    placeholder = nn.Parameter(placeholder, requires_grad=False)
                placeholders[(owner_path, attr)] = placeholder
            slots.append(TensorSlot(owner_path, table, attr, ts.name, placeholder, ts.source_index))
        out[spec.block_id] = tuple(slots)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IntegrationError(
            f"the model does not match the pool's blocks: {'; '.join(problems[:5])}{more}"
        )
    return out


@dataclass
class DenseBinding:
    """One block whose tensors are whole parameters or buffers of the model; ``path`` is the
    smallest module holding them all."""

    block_id: str
    layer: int
    nbytes: int
    path: str
    slots: tuple[TensorSlot, ...]


@dataclass(frozen=True, eq=False)
class HookGroup:
    """Dense blocks put in place by one module's pre-hook and dropped by its forward hook: one
    block at its own module, or a whole layer at the smallest module holding it."""

    module: nn.Module
    path: str
    layer: int
    blocks: tuple[tuple[str, tuple[TensorSlot, ...]], ...]  # block id, its slots
    slots: tuple[TensorSlot, ...]  # every slot of the group


def hook_groups(
    model: nn.Module, dense: dict[str, DenseBinding], granularity: str
) -> list[HookGroup]:
    """The hook modules of the dense blocks (see ``manage``'s ``granularity``)."""
    by_layer: dict[int, list[DenseBinding]] = {}
    for binding in dense.values():
        by_layer.setdefault(binding.layer, []).append(binding)
    groups = []
    for layer, bindings in by_layer.items():
        if granularity == "layer":
            path = common_path(b.path for b in bindings)
            foreign = any(b.layer != layer and under(b.path, path) for b in dense.values())
            if path and not foreign:
                blocks = tuple((b.block_id, b.slots) for b in bindings)
                every = tuple(s for b in bindings for s in b.slots)
                groups.append(HookGroup(model.get_submodule(path), path, layer, blocks, every))
                continue
        for b in bindings:
            module = model.get_submodule(b.path)
            groups.append(HookGroup(module, b.path, layer, ((b.block_id, b.slots),), b.slots))
    return groups


def under(path: str, root: str) -> bool:
    return not root or path == root or path.startswith(root + ".")


def common_path(paths: Iterable[str]) -> str:
    """The deepest module path containing every one of ``paths`` ("" is the root)."""
    split = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return ".".join(common)


class ExpertViews:
    """Stands in for one fused expert parameter ``[experts, ...]`` while an experts module runs
    transformers' eager loop: ``views[expert]`` (an int or a 0-d tensor) is the routed expert's
    leased tensor itself. ``shape`` and ``dtype`` are the fused parameter's."""

    __slots__ = ("by_expert", "path", "placeholder")

    def __init__(self, by_expert: dict[int, torch.Tensor], placeholder: torch.Tensor, path: str):
        self.by_expert = by_expert
        self.placeholder = placeholder
        self.path = path

    def __getitem__(self, index: Any) -> torch.Tensor:
        expert = int(index)
        tensor = self.by_expert.get(expert)
        if tensor is None:
            raise IntegrationError(
                f"experts module {self.path!r} read expert {expert}, which its router did not "
                f"choose (chosen: {sorted(self.by_expert)}); only routed experts are leased"
            )
        return tensor

    @property
    def shape(self) -> torch.Size:
        return self.placeholder.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.placeholder.dtype


def runs_eager_loop(module: nn.Module) -> bool:
    """The experts module dispatches to transformers' eager per-expert loop (its config's
    ``_experts_implementation`` is ``"eager"``), which indexes each fused parameter by routed
    expert only, so :class:`ExpertViews` can stand in for it."""
    config = getattr(module, "config", None)
    return getattr(config, "_experts_implementation", None) == "eager"


@dataclass(eq=False)
class Workspace:
    """Full-shape tensors standing in for fused expert parameters, shared by same-shaped
    layers; ``loaded[e]`` is (block id, lease id) of what expert slice ``e`` holds now."""

    shapes: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    loaded: list[tuple[str, str | None] | None] = field(default_factory=list)

    def ready(self) -> dict[str, torch.Tensor]:
        if not self.tensors:  # allocated on first use: zeros, so unrouted slices are finite
            self.tensors = {n: torch.zeros(s, dtype=d) for n, s, d in self.shapes}
            self.loaded = [None] * self.shapes[0][1][0]
        return self.tensors


@dataclass(eq=False)
class FusedExperts:
    """One fused experts module bound to its per-expert blocks (see the module docstring)."""

    path: str
    module: nn.Module
    router: nn.Module
    top_k: int | None
    layer: int
    block_ids: dict[int, str]  # expert index -> block id
    slots: tuple[TensorSlot, ...]  # one per fused tensor (expert 0's; attrs are shared)
    workspace: Workspace
    nbytes: int
    pending: tuple[int, ...] | None = None  # the router's choice for the current call
    last_route: tuple[int, ...] = ()

    def install(self, managed: Any) -> list[Any]:
        """Register the router and experts hooks for ``managed`` (an ``ManagedModel``)."""
        for slot in self.slots:
            slot.table[slot.attr] = slot.placeholder

        def on_route(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            indices = routed_indices(output, self.top_k, self.path)
            chosen = tuple(e for e in torch.unique(indices).tolist() if e in self.block_ids)
            self.pending = self.last_route = chosen
            managed.client.record_route(managed.model_name, managed.steps, self.layer, chosen)

        def pre(_module: nn.Module, _args: tuple[Any, ...]) -> None:
            if managed.state.layer != self.layer:
                managed._enter_layer(self.layer)
            chosen = self.pending
            if chosen is None:
                raise IntegrationError(
                    f"experts module {self.path!r} ran before its router reported a choice; "
                    "expected the router's forward first (pass routers= to manage)"
                )
            client = managed.client
            ids = [self.block_ids[e] for e in chosen]
            managed.lease(ids)  # one remote call for every expert not leased yet (kept)
            if runs_eager_loop(self.module):
                # Views: the running module holds these blocks' leased tensors (safe points
                # leave them alone until the forward hook puts the placeholders back).
                managed.blocks_of_slots[id(self.slots)] = tuple(ids)
                leased = [client.get(block_id, True) for block_id in ids]
                for slot in self.slots:
                    name = slot.tensor_name
                    views = {e: t[name] for e, t in zip(chosen, leased, strict=True)}
                    slot.table[slot.attr] = ExpertViews(views, slot.placeholder, self.path)
                managed.state.materialized.append(self.slots)
                return
            work = self.workspace.ready()
            loaded = self.workspace.loaded
            for expert, block_id in zip(chosen, ids, strict=True):
                tensors = client.get(block_id, True)
                lease = client.lease_of(block_id)
                key = (block_id, None if lease is None else lease.lease_id)
                if loaded[expert] != key or key[1] is None:
                    for slot in self.slots:
                        work[slot.attr][expert].copy_(tensors[slot.tensor_name])
                    loaded[expert] = key
            for slot in self.slots:
                slot.table[slot.attr] = work[slot.attr]
            managed.state.materialized.append(self.slots)

        def post(_module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
            for slot in self.slots:
                slot.table[slot.attr] = slot.placeholder
            held = managed.state.materialized
            if held and held[-1] is self.slots:
                held.pop()
            self.pending = None

        return [
            self.router.register_forward_hook(on_route),
            self.module.register_forward_pre_hook(pre),
            self.module.register_forward_hook(post),
        ]


def routed_indices(output: Any, top_k: int | None, path: str) -> torch.Tensor:
    """The expert indices a router chose: its last integer output (transformers 5 routers
    return ``(logits, weights, indices)``), else the top-k of its logits."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    ints = [
        t
        for t in items
        if isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex())
    ]
    if ints:
        return ints[-1]
    if top_k is None or not isinstance(items[0], torch.Tensor):
        raise IntegrationError(
            f"the router of experts module {path!r} returned no expert indices and has no "
            "top_k attribute; expected (logits, weights, indices) or logits with top_k"
        )
    return torch.topk(items[0], top_k, dim=-1).indices


def bind_fused_experts(
    model: nn.Module,
    fused: dict[str, list[BlockSpec]],
    slots_of: dict[str, tuple[TensorSlot, ...]],
    routers: dict[str, nn.Module],
) -> dict[str, FusedExperts]:
    """A :class:`FusedExperts` per experts module path in ``fused`` (its expert blocks).

    Raises:
        IntegrationError: an experts module has no router, or the pool lacks some of its
            experts, or its blocks mix fused and whole tensors.
    """
    out: dict[str, FusedExperts] = {}
    workspaces: dict[tuple[Any, ...], Workspace] = {}
    for path, specs in fused.items():
        module = model.get_submodule(path)
        slots = slots_of[specs[0].block_id]
        count = int(slots[0].placeholder.shape[0])
        block_ids: dict[int, str] = {}
        for spec in specs:
            own = slots_of[spec.block_id]
            indices = {s.source_index for s in own}
            if len(indices) != 1 or None in indices:
                raise IntegrationError(
                    f"block {spec.block_id!r}: tensors {[s.tensor_name for s in own]} mix "
                    "experts or whole tensors; expected one expert's slices of fused tensors"
                )
            block_ids[int(next(iter(indices)))] = spec.block_id  # type: ignore[arg-type]
        if sorted(block_ids) != list(range(count)):
            raise IntegrationError(
                f"experts module {path!r} holds {count} experts; the pool has blocks for "
                f"experts {sorted(block_ids)}: expected all of them"
            )
        router, top_k = _find_router(model, path, routers)
        shapes = tuple(
            (s.attr, tuple(s.placeholder.shape), s.placeholder.dtype)
            for s in sorted(slots, key=lambda s: s.attr)
        )
        workspace = workspaces.setdefault(shapes, Workspace(shapes))
        out[path] = FusedExperts(
            path,
            module,
            router,
            top_k,
            specs[0].layer,
            block_ids,
            slots,
            workspace,
            sum(s.full_nbytes for s in specs),
        )
    return out


def _find_router(
    model: nn.Module, path: str, routers: dict[str, nn.Module]
) -> tuple[nn.Module, int | None]:
    parent = model.get_submodule(path.rpartition(".")[0])
    router = routers.get(path)
    if router is None:
        found: Iterable[Any] = (getattr(parent, name, None) for name in ROUTER_NAMES)
        router = next((m for m in found if isinstance(m, nn.Module)), None)
    if router is None:
        raise IntegrationError(
            f"experts module {path!r}: no router found (a sibling named one of {ROUTER_NAMES}); "
            "pass routers={path: module} to manage"
        )
    top_k = getattr(router, "top_k", None) or getattr(parent, "top_k", None)
    return router, None if top_k is None else int(top_k)
