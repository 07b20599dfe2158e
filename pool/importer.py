"""Import: turn a checkpoint (safetensors file or directory, or a torch state dict) into blocks.

Import is two steps. :func:`plan_blocks` reads only names, shapes and dtypes and groups tensors into
:class:`BlockSpec` values by a :class:`GroupingRule`; :meth:`CheckpointSource.load_block` then reads
one block's tensors when it is written. A safetensors checkpoint is memory-mapped and a fused
expert tensor is sliced on read, so importing never holds more than one block in memory.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from pool.blocks import DTYPE_ITEMSIZE, BlockKind, BlockSpec, TensorSpec
from pool.codecs._common import dtype_name
from pool.errors import CheckpointError

# safetensors' dtype codes, mapped to torch's names.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str


class CheckpointSource(Protocol):
    """Where a checkpoint's tensors come from; implementations read lazily."""

    def tensor_infos(self) -> Mapping[str, TensorInfo]: ...

    def load(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor ``name``, or its slice ``[index]`` along dimension 0."""
        ...


@dataclass(frozen=True)
class GroupingRule:
    """How checkpoint keys become blocks; each field is a regular expression on a module path.

    By default a block is one module (the key less its last component). With ``per_expert``, each
    expert of an MoE layer becomes its own block: per-expert modules (``...experts.3.w1.weight``,
    ``...experts.expert_3.wi.weight``) are gathered under ``.../experts/expert.3``, and fused
    expert parameters (transformers 5: one tensor ``...experts.gate_up_proj`` of shape
    ``[experts, ...]``) are split along dimension 0. A shared expert (``shared_expert``,
    ``shared_experts``) is one block, like a routed expert.

    Layers: the number after ``layers``, ``layer``, ``h``, ``block`` or ``blocks``. A model with
    several stacks (an encoder and a decoder) numbers them one after the other, encoder first.
    """

    per_expert: bool = True
    expert_container: str = r"(?:^|\.)experts$"
    layer: str = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)"
    shared_expert: str = r"(?:^|\.)shared_experts?(?:_gate)?(?:\.|$)"
    embedding: str = r"(?:^|\.)(?:embed\w*|embeddings|wte|wpe)(?:\.|$)"
    head: str = r"^(?:\w+\.)?(?:lm_head|embed_out|head|classifier|score)$"


DEFAULT_RULE = GroupingRule()
_PER_EXPERT_MODULE = re.compile(
    r"^(?P<container>(?:.*\.)?experts)\.(?:expert_)?(?P<index>\d+)(?:\.(?P<rest>.+))?$"
)
_SHARED_EXPERT_MODULE = re.compile(r"^(?P<container>(?:.*\.)?shared_experts?)\.(?P<rest>.+)$")


@dataclass
class _Group:
    module: str
    expert: int | None
    tensors: list[TensorSpec]


def _split_key(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def plan_blocks(
    source: CheckpointSource, model: str, rule: GroupingRule = DEFAULT_RULE
) -> list[BlockSpec]:
    """Group a checkpoint's tensors into block specs, in layer order (then checkpoint key order).

    Raises:
        CheckpointError: the model name is not usable in a block id, or fused expert tensors of
            one module disagree on the number of experts (or have none).
    """
    if not model or "/" in model or model.strip() != model:
        raise CheckpointError(
            f"model name {model!r} is not valid: expected a non-empty name without '/' or "
            "surrounding spaces"
        )
    container = re.compile(rule.expert_container)
    groups: dict[tuple[str, int | None], _Group] = {}
    fused_counts: dict[str, tuple[int, str]] = {}

    def add(module: str, expert: int | None, spec: TensorSpec) -> None:
        group = groups.setdefault((module, expert), _Group(module, expert, []))
        group.tensors.append(spec)

    for key, info in source.tensor_infos().items():
        module, leaf = _split_key(key)
        if not module:  # a top-level tensor is a module of its own
            module = key
        per_expert = _PER_EXPERT_MODULE.match(module) if rule.per_expert else None
        shared = _SHARED_EXPERT_MODULE.match(module) if rule.per_expert else None
        if per_expert and container.search(per_expert["container"]):
            rest = per_expert["rest"]
            name = f"{rest}.{leaf}" if rest else leaf
            add(
                per_expert["container"],
                int(per_expert["index"]),
                TensorSpec(name, key, info.shape, info.dtype),
            )
        elif rule.per_expert and container.search(module) and info.shape:
            n_experts = info.shape[0]
            seen = fused_counts.setdefault(module, (n_experts, key))
            if seen[0] != n_experts or n_experts == 0:
                raise CheckpointError(
                    f"fused expert tensor {key!r} has {n_experts} experts along dimension 0; "
                    f"expected {seen[0] or 'at least 1'} as in {seen[1]!r}"
                )
            for index in range(n_experts):
                add(module, index, TensorSpec(leaf, key, info.shape[1:], info.dtype, index))
        elif shared:
            name = f"{shared['rest']}.{leaf}"
            add(shared["container"], None, TensorSpec(name, key, info.shape, info.dtype))
        else:
            add(module, None, TensorSpec(leaf, key, info.shape, info.dtype))

    layers = _number_layers(re.compile(rule.layer), [g.module for g in groups.values()])
    after_last = max((x for x in layers.values() if x is not None), default=-1) + 1
    specs = []
    for group in groups.values():
        kind = _kind_of(rule, group)
        layer = layers[group.module]
        if layer is None:
            layer = -1 if kind is BlockKind.EMBEDDING else after_last
        block_id = f"{model}/{group.module}"
        if group.expert is not None:
            block_id += f"/expert.{group.expert}"
        specs.append(BlockSpec(block_id, tuple(group.tensors), layer, kind, group.expert))
    specs.sort(key=lambda spec: spec.layer)  # stable: key order within a layer
    return specs


def _number_layers(layer_re: re.Pattern[str], modules: list[str]) -> dict[str, int | None]:
    """Global layer index per module: stacks (the path before the layer number) are numbered
    one after the other, an encoder stack before the others, then in order of appearance."""
    local: dict[str, tuple[str, int] | None] = {}
    depth: dict[str, int] = {}
    for module in modules:
        match = layer_re.search(module)
        if match is None:
            local[module] = None
            continue
        stack = module[: match.start()]
        local[module] = (stack, int(match.group(1)))
        depth[stack] = max(depth.get(stack, 0), int(match.group(1)) + 1)
    ordered = sorted(depth, key=lambda stack: "encoder" not in stack)  # stable otherwise
    offsets, total = {}, 0
    for stack in ordered:
        offsets[stack] = total
        total += depth[stack]
    return {
        module: None if where is None else offsets[where[0]] + where[1]
        for module, where in local.items()
    }


def _kind_of(rule: GroupingRule, group: _Group) -> BlockKind:
    if group.expert is not None:
        return BlockKind.EXPERT
    if re.search(rule.shared_expert, group.module):
        return BlockKind.SHARED_EXPERT
    if re.search(rule.head, group.module):
        return BlockKind.HEAD
    if re.search(rule.embedding, group.module):
        return BlockKind.EMBEDDING
    return BlockKind.DENSE


def load_block(source: CheckpointSource, spec: BlockSpec) -> dict[str, torch.Tensor]:
    """Read one block's tensors from its checkpoint (fused expert tensors sliced on read)."""
    return {t.name: source.load(t.source, t.source_index) for t in spec.tensors}


class StateDictSource:
    """A torch module's state dict (or any mapping of names to tensors) as a checkpoint.

    Tensors that share storage (tied weights) are imported as separate blocks here; recognising
    ties as regenerable blocks is the placement layer's job.
    """

    def __init__(self, state: torch.nn.Module | Mapping[str, torch.Tensor]):
        tensors = state.state_dict() if isinstance(state, torch.nn.Module) else dict(state)
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"state dict entry {key!r} is a {type(value).__name__}; expected a tensor"
                )
        self._tensors = tensors

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return {
            k: TensorInfo(tuple(v.shape), dtype_name(v.dtype)) for k, v in self._tensors.items()
        }

    def load(self, name: str, index: int | None = None) -> torch.Tensor:
        tensor = self._tensors[name].detach()
        return tensor if index is None else tensor[index]


INDEX_NAME = "model.safetensors.index.json"


def _shards_of(directory: Path) -> list[Path]:
    """The shard files of a checkpoint directory: those its index names when it has one (all
    of them must exist; other files are ignored), else every ``*.safetensors`` file."""
    index = directory / INDEX_NAME
    if not index.is_file():
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory}: directory holds no *.safetensors files")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{index}: not a valid index ({err!r}); expected a JSON object with a 'weight_map'"
        ) from None
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{index}: names shards {missing} that are not in {directory} (incomplete download?)"
        )
    return [directory / n for n in names]


class SafetensorsSource:
    """A safetensors file, or a directory of ``*.safetensors`` shards, read by memory map.

    Every file's header is checked against the file on construction, so that a truncated or
    malformed checkpoint is refused before anything is imported. A directory with a
    ``model.safetensors.index.json`` is read by its index. ``close()`` (or ``with``) releases the
    mapped files.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            files = _shards_of(path)
        elif path.is_file():
            files = [path]
        else:
            raise CheckpointError(f"{path}: no such file or directory")
        self._infos: dict[str, TensorInfo] = {}
        self._file_of: dict[str, Path] = {}
        for file in files:
            for key, info in read_safetensors_header(file).items():
                if key in self._infos:
                    raise CheckpointError(
                        f"{file}: tensor {key!r} is also in {self._file_of[key]}; expected each "
                        "tensor in exactly one shard"
                    )
                self._infos[key] = info
                self._file_of[key] = file
        self._handles: dict[Path, object] = {}

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def _handle(self, file: Path) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def load(self, name: str, index: int | None = None) -> torch.Tensor:
        from safetensors import SafetensorError

        file = self._file_of[name]
        try:
            handle = self._handle(file)
            tensor: torch.Tensor = (
                handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
            )
        except SafetensorError as err:
            raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({err})") from None
        return tensor


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header against the file's size (the format's own layout:
    an 8-byte little-endian header length, a JSON header, then the data section).

    Raises:
        CheckpointError: the file is too short, truncated, or its header is not what the format
            requires; the message names the file, the tensor and the expected value.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(
                f"{path}: file is {size} bytes; a safetensors file starts with an 8-byte header "
                "length"
            )
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: header length field says {header_len} bytes but only {size - 8} follow "
                "(truncated, or not a safetensors file)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: header is a JSON {type(header).__name__}; expected an object"
        )
    data_size = size - 8 - header_len
    infos = {}
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        infos[key], span = _check_entry(path, key, entry, data_size)
        spans.append((*span, key))
    # The format lays tensors out back to back: no gap, no overlap, the data section covered.
    position, previous = 0, None
    for begin, end, key in sorted(spans):
        if begin != position:
            what = "overlaps" if begin < position else "leaves a gap after"
            raise CheckpointError(
                f"{path}: tensor {key!r} starts at data byte {begin}, which {what} "
                f"{previous!r} (ending at {position}); expected {position}"
            )
        position, previous = end, key
    if position != data_size:
        raise CheckpointError(
            f"{path}: tensors cover {position} data bytes but the data section has {data_size}"
        )
    return infos


def _check_entry(
    path: Path, key: str, entry: object, data_size: int
) -> tuple[TensorInfo, tuple[int, int]]:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(
            f"{path}: tensor {key!r} header entry is {entry!r}; expected an object with "
            "'dtype', 'shape' and 'data_offsets'"
        )
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {key!r} has dtype {entry['dtype']!r}; expected one of "
            f"{sorted(SAFETENSORS_DTYPES)}"
        )
    shape, offsets = entry["shape"], entry["data_offsets"]

    def is_count(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise CheckpointError(
            f"{path}: tensor {key!r} has shape {shape!r}; expected a list of ints >= 0"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        raise CheckpointError(
            f"{path}: tensor {key!r} has data_offsets {offsets!r}; expected [begin, end]"
        )
    expected = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    begin, end = offsets
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {key!r} spans {end - begin} bytes; expected {expected} for shape "
            f"{shape} of {dtype}"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: tensor {key!r} ends at data byte {end} but the data section has "
            f"{data_size} bytes (file truncated?)"
        )
    return TensorInfo(tuple(shape), dtype), (begin, end)
