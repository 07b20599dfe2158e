"""Record real routing from a transformers MoE model through router hooks.

The model is built from its architecture's config at the preset's shape (layers, experts,
top-k) with a small hidden size and random weights, since no checkpoint can be downloaded here:
the routing is that of the real architecture's router code, not of trained weights. Every router
module (transformers 5's ``*TopKRouter``, which returns ``(logits, scores, indices)``) is hooked;
each decode step of a sampled generation becomes one step of the trace (greedy decoding of a
random model repeats one token, and with it one routing, forever).
"""

from __future__ import annotations

import numpy as np

from bench.replay.trace import Trace


def record_mixtral(
    moe_layers: int, experts: int, top_k: int, steps: int, seed: int = 0, hidden: int = 64
) -> Trace:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=moe_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = MixtralForCausalLM(config).eval()
    routers = [
        (index, module)
        for index, layer in enumerate(model.model.layers)
        for name, module in layer.named_modules()
        if type(module).__name__.endswith("TopKRouter")
    ]
    if len(routers) != moe_layers:
        raise RuntimeError(f"found {len(routers)} routers in the model; expected {moe_layers}")
    rows: list[tuple[int, int, np.ndarray]] = []
    forward = {"count": 0}

    def hook_for(layer: int):  # type: ignore[no-untyped-def]
        def hook(module, args, output) -> None:  # type: ignore[no-untyped-def]
            indices = output[-1] if isinstance(output, tuple) else torch.topk(output, top_k)[1]
            step = forward["count"]
            rows.append((step, layer, np.unique(indices[-1].cpu().numpy())))  # the newest token

        return hook

    handles = [module.register_forward_hook(hook_for(i)) for i, module in routers]

    def count(module, args, output) -> None:  # type: ignore[no-untyped-def]
        forward["count"] += 1

    handles.append(model.register_forward_hook(count))
    try:
        with torch.no_grad():
            prompt = torch.randint(1, config.vocab_size, (1, 1))
            model.generate(
                prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=True, top_k=0
            )
    finally:
        for handle in handles:
            handle.remove()
    step = np.concatenate([np.full(len(e), s, np.int64) for s, _, e in rows])
    layer = np.concatenate([np.full(len(e), at, np.int64) for _, at, e in rows])
    expert = np.concatenate([e.astype(np.int64) for _, _, e in rows])
    keep = step < steps
    return Trace(
        step[keep], layer[keep], expert[keep], moe_layers, experts, top_k, "recorded:mixtral"
    )
