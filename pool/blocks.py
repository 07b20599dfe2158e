"""Block specs: the managed unit and the quality metadata the guardrail reads.

A block groups the tensors of one module (a linear layer's weight and bias, one MoE expert's
projections, an embedding table). Specs are immutable and validated on construction: a spec that
exists is a spec whose fields are within contract.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pool.encoding import Precision
from pool.errors import SpecError

# Element sizes of the dtypes a checkpoint may hold, by the name torch gives them.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})


class BlockKind(enum.Enum):
    DENSE = "dense"
    EXPERT = "expert"
    SHARED_EXPERT = "shared-expert"
    EMBEDDING = "embedding"
    HEAD = "head"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a block.

    Attributes:
        name: the tensor's name inside its block (``weight``, ``bias``, ``gate_up_proj``).
        source: the checkpoint key it was read from.
        shape: the tensor's shape inside the block (for a fused expert tensor, one expert's slice).
        dtype: torch's name for the dtype, without the ``torch.`` prefix.
        source_index: for a fused expert tensor (``[experts, ...]``), the expert's index along
            dimension 0 of the source tensor; ``None`` when the block holds the whole tensor.
    """

    name: str
    source: str
    shape: tuple[int, ...]
    dtype: str
    source_index: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_ITEMSIZE:
            raise SpecError(
                f"tensor {self.source!r}: dtype {self.dtype!r} is not supported; expected one of "
                f"{sorted(DTYPE_ITEMSIZE)}"
            )
        if any((not isinstance(d, int)) or d < 0 for d in self.shape):
            raise SpecError(
                f"tensor {self.source!r}: shape {self.shape!r} must be non-negative integers"
            )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]

    @property
    def quantizable(self) -> bool:
        """Whether reduced precisions apply to this tensor.

        Floating-point tensors of two or more dimensions (weight matrices, embedding tables,
        expert projections) are quantized; vectors (biases, norm weights) and integer buffers are
        kept at full precision in every encoding, as weight-only quantization schemes do.
        """
        return self.dtype in FLOAT_DTYPES and len(self.shape) >= 2 and self.numel > 0


@dataclass(frozen=True)
class BlockSpec:
    """The managed unit.

    Attributes:
        block_id: ``"<model>/<module path>[/expert.<i>]"``, unique in a pool.
        tensors: the block's tensors, in a fixed order.
        layer: position in the layer schedule: ``-1`` before the first layer (embeddings),
            ``0..L-1`` for layer ``l``, ``L`` after the last (final norm, head).
        kind: dense, expert, shared-expert, embedding or head.
        expert: the expert index for an expert block, else ``None``.
        sensitivity: predicted output drift if this block alone is held at a precision, per
            reduced precision; finite and non-negative. ``FULL`` is 0 by definition. A precision
            without an entry is unknown (the policy treats unknown as "not allowed below floor").
        floor: the lowest precision the guardrail will ever allow for this block.
    """

    block_id: str
    tensors: tuple[TensorSpec, ...]
    layer: int
    kind: BlockKind = BlockKind.DENSE
    expert: int | None = None
    sensitivity: Mapping[Precision, float] = field(default_factory=dict)
    floor: Precision = Precision.INT4

    def __hash__(self) -> int:  # block ids are unique in a pool; the mapping field is unhashable
        return hash(self.block_id)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, BlockKind):
            raise SpecError(
                f"block {self.block_id!r}: kind {self.kind!r}; expected a BlockKind, one of "
                f"{[k.value for k in BlockKind]}"
            )
        if not isinstance(self.floor, Precision):
            raise SpecError(
                f"block {self.block_id!r}: floor {self.floor!r}; expected a Precision, one of "
                f"{[p.value for p in Precision]}"
            )
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise SpecError(f"block {self.block_id!r}: layer {self.layer!r}; expected an int >= -1")
        if not isinstance(self.block_id, str) or not self.block_id or "/" not in self.block_id:
            raise SpecError(
                f"block id {self.block_id!r} is not valid: expected '<model>/<module path>'"
            )
        if not self.tensors:
            raise SpecError(f"block {self.block_id!r} has no tensors; expected at least one")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise SpecError(f"block {self.block_id!r} has duplicate tensor names: {names}")
        if (self.kind is BlockKind.EXPERT) != (self.expert is not None):
            raise SpecError(
                f"block {self.block_id!r}: kind {self.kind.value!r} with expert={self.expert!r}; "
                "expected an expert index exactly when the kind is 'expert'"
            )
        if self.expert is not None and self.expert < 0:
            raise SpecError(f"block {self.block_id!r}: expert index {self.expert} must be >= 0")
        if self.layer < -1:
            raise SpecError(f"block {self.block_id!r}: layer {self.layer} must be >= -1")
        for precision, value in self.sensitivity.items():
            if not isinstance(precision, Precision):
                raise SpecError(
                    f"block {self.block_id!r}: sensitivity key {precision!r} is not a Precision"
                )
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise SpecError(
                    f"block {self.block_id!r}: sensitivity at {precision.value} is {value!r}; "
                    "expected a finite number >= 0"
                )
            if precision is Precision.FULL and value != 0:
                raise SpecError(
                    f"block {self.block_id!r}: sensitivity at full is {value!r}; expected 0 "
                    "(full precision is the reference)"
                )
        # Freeze the mapping so that a frozen spec cannot be changed through it.
        object.__setattr__(self, "sensitivity", MappingProxyType(dict(self.sensitivity)))

    @property
    def model(self) -> str:
        return self.block_id.split("/", 1)[0]

    @property
    def full_nbytes(self) -> int:
        """Bytes of the block at full precision (the checkpoint's own dtypes)."""
        return sum(t.nbytes for t in self.tensors)

    def tensor(self, name: str) -> TensorSpec:
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise KeyError(f"block {self.block_id!r} has no tensor {name!r}; it has {self.names}")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]
