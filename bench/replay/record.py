"""Record real routing from a transformers MoE model through router hooks.

No checkpoint can be downloaded here, so the model is built from the OLMoE architecture's config
(``OlmoeForCausalLM``: its router, top-k and softmax code) at the preset's routing shape (MoE
layers, experts, top-k) with a small hidden size and random weights, and it reads real text:
words of a text corpus on disk (by default the licence texts under ``/usr/share/common-licenses``),
numbered by frequency (the 4,095 most common words, every other word one id), fed in one forward
pass, each position one decode step (teacher forcing, as decoding that text with a KV cache).

What makes the routing depend on the token: with random weights at the default scale the
attention and expert outputs pile up in the residual stream until deep layers see nearly the
same hidden state for every token (a 32-layer Mixtral-shaped model routed every token of a text
to the same 2 or 3 experts at its last layer). Here the output projections (attention ``o_proj``
and the experts' ``down_proj``) are scaled by ``output_gain`` (0.1), so the residual stream keeps
the token's identity through depth and every layer routes by token and, a little, by context.
That is the behaviour OpenMoE reports for trained routers (Xue et al. 2024, arXiv:2402.01739:
routing is decided mostly by the token id, "context-independent specialization"), and the trace
inherits the text's Zipfian word frequencies as expert popularity.

What it is not: a trained model's routing. Expert loads are less skewed than trained routers'
(no learned preference, only word frequency), cross-layer affinity comes from the shared token
rather than from learned features, and a word-level vocabulary stands in for a tokenizer.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np

from bench.replay.trace import Trace, TraceError

DEFAULT_CORPUS = Path("/usr/share/common-licenses")
VOCAB = 4096


def corpus_token_ids(corpus: Path, count: int, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    """``count`` consecutive word ids from the text files under ``corpus`` (a file or a folder,
    read in name order), starting at an offset chosen by ``seed``.

    Raises:
        TraceError: the corpus does not exist or holds fewer than ``count`` words.
    """
    files = sorted(p for p in corpus.rglob("*") if p.is_file()) if corpus.is_dir() else [corpus]
    if not corpus.exists() or not files:
        raise TraceError(f"corpus {corpus}: no such file or folder of text files")
    text = " ".join(p.read_text(errors="ignore") for p in files)
    words = re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", text.lower())
    if len(words) < count:
        raise TraceError(f"corpus {corpus}: {len(words)} words; {count} tokens were asked for")
    ranked = [w for w, _ in collections.Counter(words).most_common(vocab - 1)]
    index = {word: i + 1 for i, word in enumerate(ranked)}  # 0: any rarer word
    start = (seed * 7919) % (len(words) - count + 1)
    return np.array([index.get(w, 0) for w in words[start : start + count]], np.int64)


def record_routing(
    moe_layers: int,
    experts: int,
    top_k: int,
    steps: int,
    seed: int = 0,
    corpus: Path = DEFAULT_CORPUS,
    hidden: int = 64,
    output_gain: float = 0.1,
) -> Trace:
    """A trace of ``steps`` tokens of the corpus's text through an OLMoE-architecture model of
    this routing shape (see the module docstring). Deterministic for a seed and corpus.

    Raises:
        TraceError: the corpus is missing or too short.
        RuntimeError: the model's router modules were not found (a transformers change).
    """
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    tokens = corpus_token_ids(corpus, steps, seed)
    torch.manual_seed(seed)
    config = OlmoeConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=moe_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=experts,
        num_experts_per_tok=top_k,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = OlmoeForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(output_gain)
            for name, parameter in layer.mlp.named_parameters():
                if "down" in name:
                    parameter.mul_(output_gain)
    routers = [
        module
        for layer in model.model.layers
        for module in layer.modules()
        if type(module).__name__.endswith("TopKRouter")
    ]
    if len(routers) != moe_layers:
        raise RuntimeError(f"found {len(routers)} routers in the model; expected {moe_layers}")
    chosen: dict[int, np.ndarray] = {}

    def hook_for(layer: int):  # type: ignore[no-untyped-def]
        def hook(module, args, output) -> None:  # type: ignore[no-untyped-def]
            indices = output[-1] if isinstance(output, tuple) else torch.topk(output, top_k)[1]
            chosen[layer] = indices.reshape(-1, top_k).cpu().numpy()  # [tokens, top_k]

        return hook

    handles = [module.register_forward_hook(hook_for(i)) for i, module in enumerate(routers)]
    try:
        with torch.no_grad():
            model(torch.from_numpy(tokens)[None, :])
    finally:
        for handle in handles:
            handle.remove()
    per_layer = np.stack([np.sort(chosen[layer], axis=1) for layer in range(moe_layers)])
    layer, step, _ = np.indices(per_layer.shape)
    order = np.lexsort((per_layer.ravel(), layer.ravel(), step.ravel()))
    return Trace(
        step.ravel()[order].astype(np.int64),
        layer.ravel()[order].astype(np.int64),
        per_layer.ravel()[order].astype(np.int64),
        moe_layers,
        experts,
        top_k,
        f"recorded:olmoe-random-router:{corpus.name}",
    )
