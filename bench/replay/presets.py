"""Model and hardware presets with real parameter shapes.

Sizes are bfloat16 (2 bytes per parameter). A model is laid out as blocks the way weightpool
imports it: per layer one attention block (attention, norms and the router), then either a dense
MLP block or one block per routed expert and one per shared expert; plus the embedding and the
head. Shapes are from each model's published config (``config.json`` on the model hub).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

BF16 = 2


@dataclass(frozen=True)
class ModelPreset:
    name: str
    layers: int  # transformer layers
    dense_layers: int  # leading layers with a dense MLP instead of experts
    experts: int  # routed experts per MoE layer
    top_k: int
    shared_experts: int
    hidden: int
    expert_intermediate: int
    dense_intermediate: int
    attention_params: int  # per layer, norms and router included
    vocab: int

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.expert_intermediate * BF16  # gate, up, down projections

    @property
    def dense_mlp_bytes(self) -> int:
        return 3 * self.hidden * self.dense_intermediate * BF16

    @property
    def attention_bytes(self) -> int:
        return (self.attention_params + self.hidden * self.experts) * BF16

    @property
    def embedding_bytes(self) -> int:
        return self.vocab * self.hidden * BF16


MODELS: dict[str, ModelPreset] = {
    # Mixtral-8x7B-v0.1: hidden 4096, 14336 per expert, GQA 32 q heads / 8 kv heads of 128.
    "mixtral-8x7b": ModelPreset(
        "mixtral-8x7b",
        32,
        0,
        8,
        2,
        0,
        4096,
        14336,
        14336,
        4096 * (4096 + 1024 + 1024) + 4096 * 4096 + 2 * 4096,
        32000,
    ),
    # DeepSeek-V3: 61 layers, the first 3 dense (18432), 58 MoE of 256 routed experts (2048) and
    # one shared expert, top-8; MLA attention (q LoRA 1536, kv LoRA 512, 128 heads).
    "deepseek-v3": ModelPreset(
        "deepseek-v3",
        61,
        3,
        256,
        8,
        1,
        7168,
        2048,
        18432,
        7168 * 1536
        + 1536 * 128 * 192
        + 7168 * 576
        + 512 * 128 * 256
        + 128 * 128 * 7168
        + 2 * 7168
        + 1536
        + 512,
        129280,
    ),
    # Qwen3-30B-A3B: 48 layers, 128 experts of 768, top-8; 32 q heads / 4 kv heads of 128.
    "qwen3-30b-a3b": ModelPreset(
        "qwen3-30b-a3b",
        48,
        0,
        128,
        8,
        0,
        2048,
        768,
        6144,
        2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 2 * 2048 + 2 * 128,
        151936,
    ),
}


@dataclass(frozen=True)
class HardwarePreset:
    name: str
    hbm_bytes: int
    hbm_gbps: float  # HBM bandwidth: decode is bound by reading weights
    host_gbps: float  # host to HBM, practical
    cxl_gbps: float
    nvme_gbps: float
    transfer_latency_s: float
    layer_overhead_s: float  # kernel launches and the rest of a layer's fixed cost

    def compute_s(self, weight_bytes: float) -> float:
        """Decode time of a layer that reads ``weight_bytes`` of weights once."""
        return self.layer_overhead_s + weight_bytes / (self.hbm_gbps * 1e9)


HARDWARE: dict[str, HardwarePreset] = {
    "h100-pcie5": HardwarePreset("h100-pcie5", 80 * 10**9, 3350.0, 50.0, 30.0, 12.0, 10e-6, 20e-6),
    "a100-pcie4": HardwarePreset("a100-pcie4", 80 * 10**9, 2039.0, 25.0, 15.0, 7.0, 10e-6, 25e-6),
}


@dataclass(frozen=True)
class Layout:
    """The blocks of a model preset, as arrays, and where each schedule position finds them.

    Positions: 0 is the embedding, ``1 + l`` is layer ``l``, ``layers + 1`` is the head.
    """

    model: ModelPreset
    block_names: tuple[str, ...]
    nbytes: np.ndarray  # [N] full precision
    position: np.ndarray  # [N]
    kind: np.ndarray  # [N] "dense", "expert", "shared-expert", "embedding", "head"
    expert: np.ndarray  # [N] routed expert index or -1
    dense_at: tuple[np.ndarray, ...]  # per position, the blocks every token needs
    expert_block: np.ndarray  # [moe_layers, experts] block index of each routed expert

    @property
    def positions(self) -> int:
        return self.model.layers + 2

    @cached_property
    def moe_layer_of_block(self) -> list[int]:
        """Per block, the trace's MoE layer of its position, or -1 (a list: read per block in
        the replay's Python loops, where a numpy scalar read costs more than the work)."""
        return [self.moe_layer_of_position(int(p)) for p in self.position.tolist()]

    @cached_property
    def is_expert(self) -> list[bool]:
        """Per block, whether it is a routed expert."""
        return (self.kind == "expert").tolist()

    def moe_layer_of_position(self, position: int) -> int:
        """The trace's MoE layer index at a schedule position, or -1."""
        layer = position - 1
        if layer < self.model.dense_layers or layer >= self.model.layers:
            return -1
        return layer - self.model.dense_layers


def layout(model: ModelPreset) -> Layout:
    names: list[str] = []
    nbytes: list[int] = []
    position: list[int] = []
    kind: list[str] = []
    expert: list[int] = []
    dense_at: list[list[int]] = [[] for _ in range(model.layers + 2)]
    expert_block = np.full((model.moe_layers, model.experts), -1, np.int64)

    def add(name: str, size: int, pos: int, what: str, index: int = -1) -> int:
        names.append(name)
        nbytes.append(size)
        position.append(pos)
        kind.append(what)
        expert.append(index)
        return len(names) - 1

    dense_at[0].append(add("embed", model.embedding_bytes, 0, "embedding"))
    for layer in range(model.layers):
        pos = layer + 1
        dense_at[pos].append(add(f"l{layer}.attn", model.attention_bytes, pos, "dense"))
        if layer < model.dense_layers:
            dense_at[pos].append(add(f"l{layer}.mlp", model.dense_mlp_bytes, pos, "dense"))
            continue
        moe = layer - model.dense_layers
        for e in range(model.experts):
            expert_block[moe, e] = add(f"l{layer}.e{e}", model.expert_bytes, pos, "expert", e)
        for s in range(model.shared_experts):
            dense_at[pos].append(
                add(f"l{layer}.shared{s}", model.expert_bytes, pos, "shared-expert")
            )
    dense_at[-1].append(add("head", model.embedding_bytes, model.layers + 1, "head"))
    return Layout(
        model,
        tuple(names),
        np.array(nbytes, np.int64),
        np.array(position, np.int64),
        np.array(kind),
        np.array(expert, np.int64),
        tuple(np.array(d, np.int64) for d in dense_at),
        expert_block,
    )
