"""Quality calibration: measure each block's sensitivity per precision on a real model.

**Sensitivity.** :attr:`pool.blocks.BlockSpec.sensitivity` at a precision is the output drift
(:func:`pool.reference_model.drift`: mean over fixed texts of ``1 - cos`` between the sentence
embeddings and the unmanaged model's) when that block alone is held at that precision, every
other block at full.

**Holding a block at a precision** means encoding its tensors with the real codec of
``pool.codecs`` and decoding them back into the model, exactly the values a tier would serve.

**Floors.** A block's floor is the precision with the fewest bits such that every precision it
admits (:func:`pool.encoding.precision_allowed`, among the precisions measured) drifts at most
``threshold`` on its own; between FP8 and INT8, which admit each other, the one that drifts less
names it. A block whose reduced precisions all pass gets INT4; one where either 8-bit precision
fails gets FULL.

The model is all-MiniLM-L6-v2 (``pool.reference_model``, whose names this module re-exports:
``load_minilm``, ``embed``, ``drift``, ``cosines``, ``CALIBRATION_TEXTS``); any model whose
forward takes a tokenizer's output and returns ``last_hidden_state`` works, as long as the
blocks' checkpoint keys name its parameters. No Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pool.blocks import BlockSpec
from pool.codecs import DEFAULT_OPTIONS, CodecOptions, decode_block, encode_block
from pool.encoding import PRECISION_BITS, Encoding, Precision, precision_allowed
from pool.errors import CheckpointError, SpecError
from pool.reference_model import (
    CALIBRATION_TEXTS,
    CachedForward,
    Tokenizer,
    cosines,
    drift,
    embed,
    load_minilm,
)

if TYPE_CHECKING:
    from pool.store import BlockStore

REDUCED_PRECISIONS: tuple[Precision, ...] = (Precision.FP8, Precision.INT8, Precision.INT4)
# A block's floor admits only precisions at which it alone drifts at most this: a tenth of the
# drift a whole-model cosine bound of 0.999 allows (1e-3). The veto's quality budget bounds the sum.
DEFAULT_THRESHOLD = 1e-4


def _model_tensors(model: torch.nn.Module, spec: BlockSpec) -> dict[str, torch.Tensor]:
    """The model's own tensors (views sharing storage) that ``spec``'s tensors name."""
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    out = {}
    for ts in spec.tensors:
        if ts.source not in named:
            raise CheckpointError(
                f"block {spec.block_id!r}, tensor {ts.name!r}: checkpoint key {ts.source!r} is "
                "not a parameter or buffer of the model; expected the model the block was "
                "planned from"
            )
        tensor = named[ts.source].detach()
        out[ts.name] = tensor if ts.source_index is None else tensor[ts.source_index]
    return out


def round_trip(
    spec: BlockSpec,
    tensors: Mapping[str, torch.Tensor],
    precision: Precision,
    options: CodecOptions = DEFAULT_OPTIONS,
) -> dict[str, torch.Tensor]:
    """The values a tier serves for ``tensors`` held at ``precision``: real encode, then decode."""
    return decode_block(spec, encode_block(spec, tensors, Encoding(precision), options))


@contextlib.contextmanager
def held_at(
    model: torch.nn.Module,
    specs: Sequence[BlockSpec],
    assignment: Mapping[str, Precision],
    options: CodecOptions = DEFAULT_OPTIONS,
) -> Iterator[None]:
    """Within the ``with``, every block named in ``assignment`` holds its weights as served at
    its precision (in place, in ``model``); on exit, even by an exception, the original values
    are restored bit for bit. Blocks not named stay at full precision.

    Raises:
        SpecError: ``assignment`` names a block that is not in ``specs`` (nothing is changed).
        CheckpointError: a block's tensors are not the model's.
    """
    by_id = {s.block_id: s for s in specs}
    unknown = sorted(set(assignment) - set(by_id))
    if unknown:
        raise SpecError(f"assignment names blocks {unknown[:3]} that are not among the specs")
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for block_id, precision in assignment.items():
            targets = _model_tensors(model, by_id[block_id])
            originals = {name: t.clone() for name, t in targets.items()}
            served = round_trip(by_id[block_id], originals, precision, options)
            for name, target in targets.items():
                saved.append((target, originals[name]))
                target.copy_(served[name])
        yield
    finally:
        for target, original in reversed(saved):
            target.copy_(original)


@dataclass(frozen=True)
class BlockCalibration:
    """One block's measurement. ``sensitivity`` holds FULL (0) and every measured precision."""

    block_id: str
    layer: int
    sensitivity: Mapping[Precision, float]
    floor: Precision

    def __post_init__(self) -> None:
        object.__setattr__(self, "sensitivity", MappingProxyType(dict(self.sensitivity)))


@dataclass(frozen=True)
class CalibrationTimings:
    """Seconds spent: reference pass, per-block measurement, total; forward passes run (each
    over every text; a pass from a later encoder layer counts as one) and their median ms."""

    reference_s: float
    measure_s: float
    total_s: float
    forwards: int
    forward_ms_median: float


@dataclass(frozen=True)
class CalibrationResult:
    """Sensitivities and floors of a model's blocks (see the module docstring).

    ``blocks`` are in the order of the specs calibrated; ``precisions`` the reduced precisions
    measured (each block's sensitivity also holds FULL at 0); ``threshold`` the floor rule's;
    ``texts`` those the drift was measured over. Frozen: equal results compare equal.
    """

    model: str
    blocks: tuple[BlockCalibration, ...]
    precisions: tuple[Precision, ...]
    threshold: float
    texts: tuple[str, ...]
    timings: CalibrationTimings
    _index: Mapping[str, BlockCalibration] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", MappingProxyType({b.block_id: b for b in self.blocks}))

    @property
    def n_texts(self) -> int:
        return len(self.texts)

    def block(self, block_id: str) -> BlockCalibration:
        try:
            return self._index[block_id]
        except KeyError:
            raise SpecError(
                f"block {block_id!r} was not calibrated (model {self.model!r})"
            ) from None

    def floors(self) -> dict[str, Precision]:
        return {b.block_id: b.floor for b in self.blocks}

    def predicted_drift(self, assignment: Mapping[str, Precision]) -> float:
        """Sum over the assigned blocks of their sensitivity at the assigned precision.

        Raises:
            SpecError: a block that was not calibrated, or a precision that was not measured.
        """
        total = 0.0
        for block_id, precision in assignment.items():
            sensitivity = self.block(block_id).sensitivity
            if precision not in sensitivity:
                raise SpecError(
                    f"block {block_id!r}: precision {precision.value} was not measured; "
                    f"expected one of {[p.value for p in sensitivity]}"
                )
            total += sensitivity[precision]
        return total

    def quality_updates(self) -> dict[str, tuple[Mapping[Precision, float], Precision]]:
        """Per block, ``(sensitivity, floor)``: what :meth:`BlockStore.update_quality` takes."""
        return {b.block_id: (b.sensitivity, b.floor) for b in self.blocks}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form that :meth:`from_dict` reads back to an equal result."""
        return {
            "model": self.model,
            "threshold": self.threshold,
            "precisions": [p.value for p in self.precisions],
            "texts": list(self.texts),
            "blocks": [
                {
                    "block_id": b.block_id,
                    "layer": b.layer,
                    "sensitivity": {p.value: v for p, v in b.sensitivity.items()},
                    "floor": b.floor.value,
                }
                for b in self.blocks
            ],
            "timings": dataclasses.asdict(self.timings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationResult:
        """Read :meth:`to_dict`'s form (other keys are ignored).

        Raises:
            SpecError: a field is missing or has a value of the wrong kind (named).
        """
        try:
            blocks = tuple(
                BlockCalibration(
                    b["block_id"],
                    int(b["layer"]),
                    {Precision(p): float(v) for p, v in b["sensitivity"].items()},
                    Precision(b["floor"]),
                )
                for b in data["blocks"]
            )
            return cls(
                str(data["model"]),
                blocks,
                tuple(Precision(p) for p in data["precisions"]),
                float(data["threshold"]),
                tuple(str(t) for t in data["texts"]),
                CalibrationTimings(**data["timings"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise SpecError(
                f"calibration record is not valid ({type(err).__name__}: {err}); expected the "
                "form CalibrationResult.to_dict writes"
            ) from None

    def apply(self, store: BlockStore) -> None:
        """Store every block's sensitivities and floor in ``store``'s catalog, all or none.

        Raises:
            UnknownBlockError: a block is not in the store (nothing is changed).
            CapacityError: a new floor makes a block too large for the store's tiers.
        """
        store.update_quality(self.quality_updates())


class _Runner(Protocol):
    reference: torch.Tensor
    forward_s: list[float]

    def full(self) -> torch.Tensor: ...

    def from_layer(self, index: int) -> torch.Tensor: ...

    def first_layer(self, tensors: Mapping[str, torch.Tensor]) -> int | None: ...


class OutputForward:
    """Drift measured on any model's outputs: ``forward()`` returns ``[rows, features]`` (e.g.
    a causal LM's next-token logits for fixed prompts), compared row by row by cosine like the
    sentence embeddings. Every measurement reruns ``forward`` whole."""

    def __init__(self, forward: Callable[[], torch.Tensor]):
        self.forward = forward
        self.forward_s: list[float] = []
        self.reference = self.full()

    def full(self) -> torch.Tensor:
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.forward().detach().float()
        self.forward_s.append(time.perf_counter() - start)
        return out

    def from_layer(self, index: int) -> torch.Tensor:
        return self.full()

    def first_layer(self, tensors: Mapping[str, torch.Tensor]) -> int | None:
        return None


def choose_floor(sensitivity: Mapping[Precision, float], threshold: float) -> Precision:
    """The floor rule of the module docstring, over the precisions in ``sensitivity``."""
    order = sorted(sensitivity, key=lambda p: (PRECISION_BITS[p], sensitivity[p]))
    for candidate in order:
        admitted = [p for p in sensitivity if precision_allowed(p, candidate)]
        if all(sensitivity[p] <= threshold for p in admitted):
            return candidate
    return Precision.FULL


def calibrate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    specs: Sequence[BlockSpec],
    texts: Sequence[str] = CALIBRATION_TEXTS,
    precisions: Sequence[Precision] = REDUCED_PRECISIONS,
    threshold: float = DEFAULT_THRESHOLD,
    options: CodecOptions = DEFAULT_OPTIONS,
    progress: Callable[[BlockSpec], None] | None = None,
    outputs: OutputForward | None = None,
) -> CalibrationResult:
    """Measure every block of ``specs`` at every precision of ``precisions``, one block at a time.

    The drift is measured on the sentence embeddings of ``texts`` (``tokenizer`` and ``texts``
    are used), or, with ``outputs``, on the rows its function returns (any model: for a causal
    LM, e.g. the next-token logits of fixed prompts; ``tokenizer`` and ``texts`` are then only
    recorded).

    The model's weights are changed in place during the call and restored bit for bit before it
    returns (or raises). Deterministic for a given model, texts and thread count. A block whose
    served values equal its own at a precision (no quantizable tensor) has drift 0 there without
    a forward pass. ``progress`` is called after each block.

    Raises:
        SpecError: ``threshold`` is not a finite number >= 0, ``texts`` is empty, ``precisions``
            holds FULL or repeats, or ``specs`` are of several models.
        CheckpointError: a block's tensors are not the model's.
    """
    if isinstance(threshold, bool) or not (math.isfinite(threshold) and threshold >= 0):
        raise SpecError(f"threshold is {threshold!r}; expected a finite number >= 0")
    if not texts:
        raise SpecError("texts is empty; expected at least one text to measure drift over")
    if Precision.FULL in precisions or len(set(precisions)) != len(precisions):
        raise SpecError(
            f"precisions {[p.value for p in precisions]}: expected distinct reduced precisions"
        )
    models = sorted({s.model for s in specs})
    if len(models) != 1:
        raise SpecError(f"specs are of models {models}; expected exactly one model")
    targets = {s.block_id: _model_tensors(model, s) for s in specs}  # checks before any change
    started = time.perf_counter()
    runner: _Runner = CachedForward(model, tokenizer, texts) if outputs is None else outputs
    reference_s = time.perf_counter() - started
    blocks = []
    for spec in specs:
        own = targets[spec.block_id]
        originals = {name: t.clone() for name, t in own.items()}
        first = runner.first_layer(own)
        sensitivity = {Precision.FULL: 0.0}
        try:
            for precision in precisions:
                served = round_trip(spec, originals, precision, options)
                if all(torch.equal(served[n], originals[n]) for n in own):
                    sensitivity[precision] = 0.0
                    continue
                for name, target in own.items():
                    target.copy_(served[name])
                out = runner.full() if first is None else runner.from_layer(first)
                sensitivity[precision] = drift(out, runner.reference)
        finally:
            for name, target in own.items():
                target.copy_(originals[name])
        floor = choose_floor(sensitivity, threshold)
        blocks.append(BlockCalibration(spec.block_id, spec.layer, sensitivity, floor))
        if progress is not None:
            progress(spec)
    total_s = time.perf_counter() - started
    timings = CalibrationTimings(
        reference_s=reference_s,
        measure_s=total_s - reference_s,
        total_s=total_s,
        forwards=len(runner.forward_s),
        forward_ms_median=1e3 * statistics.median(runner.forward_s),
    )
    return CalibrationResult(
        models[0], tuple(blocks), tuple(precisions), threshold, tuple(texts), timings
    )


@dataclass(frozen=True)
class DriftCheck:
    """Predicted drift (the sum of the blocks' sensitivities) against the drift measured with
    every block of ``assignment`` held at its precision at once."""

    name: str
    assignment: Mapping[str, Precision]
    predicted: float
    measured: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "assignment", MappingProxyType(dict(self.assignment)))

    @property
    def ratio(self) -> float:
        """measured / predicted; NaN when nothing was predicted."""
        return self.measured / self.predicted if self.predicted > 0 else math.nan

    @property
    def n_reduced(self) -> int:
        return sum(p is not Precision.FULL for p in self.assignment.values())


def standard_assignments(
    result: CalibrationResult, seed: int = 0
) -> dict[str, dict[str, Precision]]:
    """Assignments worth checking: every block at each measured precision (``all-int8``, ...);
    every block at its floor (``floors``); and each block at a precision drawn uniformly from
    FULL and the measured ones, with ``random.Random(seed)`` (``random-mix``)."""
    ids = [b.block_id for b in result.blocks]
    out = {f"all-{p.value}": dict.fromkeys(ids, p) for p in result.precisions}
    out["floors"] = result.floors()
    rng = random.Random(seed)
    choices = [Precision.FULL, *result.precisions]
    out["random-mix"] = {block_id: rng.choice(choices) for block_id in ids}
    return out


def check_drift(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    specs: Sequence[BlockSpec],
    result: CalibrationResult,
    assignments: Mapping[str, Mapping[str, Precision]] | None = None,
    options: CodecOptions = DEFAULT_OPTIONS,
) -> tuple[DriftCheck, ...]:
    """Predicted against measured drift for each assignment (default :func:`standard_assignments`),
    over ``result``'s texts, with whole forward passes. The model is restored bit for bit."""
    chosen = standard_assignments(result) if assignments is None else assignments
    reference = embed(model, tokenizer, result.texts)
    checks = []
    for name, assignment in chosen.items():
        predicted = result.predicted_drift(assignment)
        with held_at(model, specs, assignment, options):
            measured = drift(embed(model, tokenizer, result.texts), reference)
        checks.append(DriftCheck(name, assignment, predicted, measured))
    return tuple(checks)


__all__ = [
    "CALIBRATION_TEXTS",
    "DEFAULT_THRESHOLD",
    "REDUCED_PRECISIONS",
    "BlockCalibration",
    "CalibrationResult",
    "CalibrationTimings",
    "DriftCheck",
    "Tokenizer",
    "calibrate",
    "check_drift",
    "choose_floor",
    "cosines",
    "drift",
    "embed",
    "held_at",
    "load_minilm",
    "round_trip",
    "standard_assignments",
]
