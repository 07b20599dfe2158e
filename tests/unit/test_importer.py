from __future__ import annotations

import json

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
    shared = specs["qw/model.layers.0.mlp.shared_expert"]  # one block, like a routed expert
    assert (shared.kind, shared.names) == (BlockKind.SHARED_EXPERT, ["up_proj.weight"])
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
    # The shared expert (gate, up and down projections) is one block; its gate another.
    assert kinds.count(BlockKind.SHARED_EXPERT) == 2
    shared = next(s for s in specs if s.block_id == "qwen/model.layers.0.mlp.shared_expert")
    assert shared.names == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]


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


def _infos(*keys: str) -> StateDictSource:
    return StateDictSource({k: torch.zeros(2, 2) for k in keys})


def test_layers_and_kinds_of_other_architectures() -> None:
    # T5 / Switch: "block.N.layer.M" is layer N; the encoder stack comes before the decoder's.
    t5 = {
        s.block_id: s
        for s in plan_blocks(
            _infos(
                "decoder.block.0.layer.0.SelfAttention.q.weight",
                "decoder.block.1.layer.2.DenseReluDense.wi.weight",
                "encoder.block.0.layer.1.DenseReluDense.wi.weight",
                "encoder.block.1.layer.0.SelfAttention.q.weight",
                "encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight",
                "encoder.block.1.layer.1.mlp.router.classifier.weight",
            ),
            "t5",
        )
    }
    assert t5["t5/encoder.block.0.layer.1.DenseReluDense.wi"].layer == 0
    assert t5["t5/encoder.block.1.layer.0.SelfAttention.q"].layer == 1
    assert t5["t5/decoder.block.0.layer.0.SelfAttention.q"].layer == 2
    assert t5["t5/decoder.block.1.layer.2.DenseReluDense.wi"].layer == 3
    switch_expert = t5["t5/encoder.block.1.layer.1.mlp.experts/expert.3"]
    assert (switch_expert.kind, switch_expert.expert) == (BlockKind.EXPERT, 3)
    assert t5["t5/encoder.block.1.layer.1.mlp.router.classifier"].kind is BlockKind.DENSE
    # Pythia's head is "embed_out"; BERT's classifier is a head; DeepSeek's shared experts.
    other = {
        s.block_id: s
        for s in plan_blocks(
            _infos(
                "gpt_neox.embed_in.weight",
                "gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
                "embed_out.weight",
                "classifier.weight",
                "model.layers.0.mlp.shared_experts.up_proj.weight",
                "model.layers.0.mlp.shared_experts.down_proj.weight",
            ),
            "x",
        )
    }
    # Two stacks with one layer each ("gpt_neox.layers", "model.layers"): the head comes after.
    assert other["x/embed_out"].kind is BlockKind.HEAD and other["x/embed_out"].layer == 2
    assert other["x/classifier"].kind is BlockKind.HEAD
    assert other["x/gpt_neox.embed_in"].kind is BlockKind.EMBEDDING
    assert other["x/model.layers.0.mlp.shared_experts"].names == [
        "up_proj.weight",
        "down_proj.weight",
    ]


def test_fused_experts_with_no_experts_are_refused() -> None:
    with pytest.raises(CheckpointError, match=r"has 0 experts along dimension 0"):
        plan_blocks(StateDictSource({"m.layers.0.experts.down_proj": torch.zeros(0, 2, 4)}), "m")


def test_sharded_directory_follows_its_index(tmp_path) -> None:
    a = {"layers.0.fc.weight": torch.randn(4, 4)}
    b = {"layers.1.fc.weight": torch.randn(4, 4)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    save_file({**a, **b}, str(tmp_path / "consolidated.safetensors"))  # a stray full copy
    index = {
        "weight_map": {
            "layers.0.fc.weight": "model-00001-of-00002.safetensors",
            "layers.1.fc.weight": "model-00002-of-00002.safetensors",
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    source = SafetensorsSource(tmp_path)
    assert sorted(source.tensor_infos()) == ["layers.0.fc.weight", "layers.1.fc.weight"]
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"names shards \['model-00002-of-00002.safetensors'\] that are not in",
    ):
        SafetensorsSource(tmp_path)
