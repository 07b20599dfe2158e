from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pool.blocks import BlockKind
from pool.errors import CheckpointError
from pool.importer import GroupingRule, SafetensorsSource, StateDictSource, load_block, plan_blocks


def tiny_mixtral() -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return MixtralForCausalLM(config)


def test_minilm_blocks_per_module(minilm_path) -> None:
    specs = plan_blocks(SafetensorsSource(minilm_path), "minilm")
    by_id = {s.block_id: s for s in specs}
    assert len(specs) == 54
    query = by_id["minilm/encoder.layer.3.attention.self.query"]
    assert (query.layer, query.kind, query.names) == (3, BlockKind.DENSE, ["bias", "weight"])
    assert query.tensor("weight").shape == (384, 384)
    words = by_id["minilm/embeddings.word_embeddings"]
    assert (words.layer, words.kind, words.full_nbytes) == (
        -1,
        BlockKind.EMBEDDING,
        30522 * 384 * 4,
    )
    assert by_id["minilm/pooler.dense"].layer == 6  # after the last of layers 0..5
    with safe_open(str(minilm_path), "pt") as f:
        total = sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118
    assert sum(s.full_nbytes for s in specs) == total


def test_fused_experts_become_one_block_per_expert() -> None:
    model = tiny_mixtral()
    state = model.state_dict()
    fused = state["model.layers.1.mlp.experts.gate_up_proj"]
    assert fused.shape[0] == 4  # transformers 5 keeps every expert of a layer in one tensor
    source = StateDictSource(model)
    specs = {s.block_id: s for s in plan_blocks(source, "mix")}
    experts = [s for s in specs.values() if s.kind is BlockKind.EXPERT]
    assert len(experts) == 2 * 4
    expert = specs["mix/model.layers.1.mlp.experts/expert.2"]
    assert (expert.layer, expert.expert) == (1, 2)
    assert expert.names == ["gate_up_proj", "down_proj"]
    assert expert.tensor("gate_up_proj").shape == tuple(fused.shape[1:])
    assert expert.tensor("gate_up_proj").source_index == 2
    tensors = load_block(source, expert)
    assert torch.equal(tensors["gate_up_proj"], fused[2])
    assert torch.equal(tensors["down_proj"], state["model.layers.1.mlp.experts.down_proj"][2])
    assert specs["mix/model.layers.1.mlp.gate"].kind is BlockKind.DENSE
    assert specs["mix/lm_head"].kind is BlockKind.HEAD
    assert specs["mix/lm_head"].layer == 2
    # Bytes are conserved: every expert slice counted once.
    assert sum(s.full_nbytes for s in specs.values()) == sum(t.nbytes for t in state.values())


def test_fused_experts_from_a_safetensors_file_are_sliced_on_read(tmp_path) -> None:
    model = tiny_mixtral()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    from_file = SafetensorsSource(tmp_path)
    specs = plan_blocks(from_file, "mix")
    from_state = plan_blocks(StateDictSource(state), "mix")
    assert {s.block_id for s in specs} == {s.block_id for s in from_state}
    assert [s.layer for s in specs] == sorted(s.layer for s in specs)  # in layer order
    for spec in specs:
        tensors = load_block(from_file, spec)
        for ts in spec.tensors:
            expected = (
                state[ts.source] if ts.source_index is None else state[ts.source][ts.source_index]
            )
            assert torch.equal(tensors[ts.name], expected)


def test_per_expert_modules_and_shared_experts() -> None:
    state = {
        "model.layers.0.mlp.experts.0.w1.weight": torch.zeros(8, 4),
        "model.layers.0.mlp.experts.0.w2.weight": torch.zeros(4, 8),
        "model.layers.0.mlp.experts.1.w1.weight": torch.ones(8, 4),
        "model.layers.0.mlp.experts.1.w2.weight": torch.ones(4, 8),
        "model.layers.0.mlp.shared_expert.up_proj.weight": torch.zeros(8, 4),
        "model.layers.0.mlp.shared_expert_gate.weight": torch.zeros(1, 4),
    }
    specs = {s.block_id: s for s in plan_blocks(StateDictSource(state), "qw")}
    one = specs["qw/model.layers.0.mlp.experts/expert.1"]
    assert (one.kind, one.expert, one.names) == (BlockKind.EXPERT, 1, ["w1.weight", "w2.weight"])
    assert specs["qw/model.layers.0.mlp.shared_expert.up_proj"].kind is BlockKind.SHARED_EXPERT
    assert specs["qw/model.layers.0.mlp.shared_expert_gate"].kind is BlockKind.SHARED_EXPERT
    # Without per-expert grouping, the default per-module rule applies.
    plain = plan_blocks(StateDictSource(state), "qw", GroupingRule(per_expert=False))
    assert "qw/model.layers.0.mlp.experts.1.w1" in {s.block_id for s in plain}


def test_qwen2_moe_fused_and_shared_experts() -> None:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=2,
    )
    specs = plan_blocks(StateDictSource(Qwen2MoeForCausalLM(config)), "qwen")
    kinds = [s.kind for s in specs]
    assert kinds.count(BlockKind.EXPERT) == 6
    assert kinds.count(BlockKind.SHARED_EXPERT) == 4  # gate, up, down projections and the gate


def test_fused_experts_that_disagree_are_refused() -> None:
    state = {
        "m.layers.0.experts.gate_up_proj": torch.zeros(4, 8, 2),
        "m.layers.0.experts.down_proj": torch.zeros(3, 2, 4),
    }
    with pytest.raises(
        CheckpointError, match=r"'m.layers.0.experts.down_proj' has 3 experts.*expected 4"
    ):
        plan_blocks(StateDictSource(state), "m")


def test_bad_model_names() -> None:
    for name in ("", "a/b", " a"):
        with pytest.raises(CheckpointError, match="model name"):
            plan_blocks(StateDictSource({"w": torch.zeros(2)}), name)
