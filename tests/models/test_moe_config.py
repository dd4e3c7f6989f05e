"""MoE HF config -> megatron-core MoE fields, layer patterns, names and refusals (no spawn)."""

from __future__ import annotations

import pytest

from eaft_megatron.models import check_parallel_sizes, get_arch, hf_names, megatron_names
from eaft_megatron.models.config import moe_config_from_hf

from tests.support.tiny_models import MOE_CASES


def test_router_fields_follow_the_hf_config():
    q3 = moe_config_from_hf(MOE_CASES["qwen3_moe"]())
    assert q3["moe_layer_freq"] == [1, 0, 1, 1] and q3["num_moe_experts"] == 8
    assert q3["moe_router_pre_softmax"] is False  # norm_topk_prob=True: softmax over the top-k
    assert q3["moe_aux_loss_coeff"] == 0.01 and q3["moe_router_load_balancing_type"] == "aux_loss"
    assert q3["moe_token_dispatcher_type"] == "alltoall" and q3["moe_grouped_gemm"] is False
    assert "moe_shared_expert_intermediate_size" not in q3
    q2 = moe_config_from_hf(MOE_CASES["qwen2_moe"]())
    assert q2["moe_layer_freq"] == [0, 1, 0, 1] and q2["moe_router_pre_softmax"] is True
    assert q2["moe_shared_expert_intermediate_size"] == 48 and q2["moe_shared_expert_gate"]
    glm = moe_config_from_hf(MOE_CASES["glm4_moe"]())
    assert glm["moe_layer_freq"] == [0, 1, 1, 1] and glm["moe_router_score_function"] == "sigmoid"
    assert glm["moe_router_enable_expert_bias"] and glm["moe_router_dtype"] == "fp32"
    assert (glm["moe_router_num_groups"], glm["moe_router_group_topk"]) == (4, 2)
    assert glm["moe_router_topk_scaling_factor"] == 2.5
    assert glm["moe_shared_expert_intermediate_size"] == 32
    assert glm["moe_shared_expert_gate"] is False


def test_names_per_layer_kind():
    config = MOE_CASES["glm4_moe"]()
    arch = get_arch(config)
    hf = hf_names(arch, config)
    assert "model.layers.0.mlp.gate_proj.weight" in hf  # dense first layer
    assert not any(n.startswith("model.layers.0.mlp.experts") for n in hf)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in hf
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in hf
    assert not any(n.startswith("model.layers.4.") for n in hf)  # MTP: not the model's
    te = megatron_names(arch, config, te=True)
    # TransformerEngine fuses the pre-MLP norm only into a dense fc1
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in te


@pytest.mark.parametrize("change, message", [
    (dict(norm_topk_prob=False), "norm_topk_prob=False is not supported with the sigmoid"),
    (dict(num_experts_per_tok=8), "scores groups by their top 4 experts"),
    (dict(first_k_dense_replace=4), "no layer is a mixture-of-experts layer"),
])
def test_unsupported_router_settings_are_refused(change, message):
    config = MOE_CASES["glm4_moe"]()
    for k, v in change.items():
        setattr(config, k, v)
    with pytest.raises(ValueError, match=message):
        moe_config_from_hf(config)


def test_expert_parallel_sizes_checked():
    config = MOE_CASES["qwen3_moe"]()
    check_parallel_sizes(config, 2, 2, ep=8)
    with pytest.raises(ValueError, match="expert parallel size 3 does not divide the 8"):
        check_parallel_sizes(config, 1, 1, ep=3)
    with pytest.raises(ValueError, match="expert tensor parallel size 3 does not divide"):
        check_parallel_sizes(config, 1, 1, ep=1, etp=3)
    from tests.support.tiny_models import CASES

    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        check_parallel_sizes(CASES["qwen3"](), 1, 1, ep=2)


def test_all_moe_config_without_intermediate_size():
    """transformers' Qwen3.5-MoE config has no ``intermediate_size`` (every layer is MoE):
    megatron's dense-FFN size, unused then, takes the expert size; no dense MLP is named."""
    import transformers

    from eaft_megatron.models.spec import ModelDims

    config = transformers.Qwen3_5MoeTextConfig(
        architectures=["Qwen3_5MoeForCausalLM"], vocab_size=300, hidden_size=64,
        num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48)
    assert not hasattr(config, "intermediate_size")
    check_parallel_sizes(config, 2, 2, ep=2)
    assert ModelDims.from_hf(config).ffn_hidden_size == 32
    names = megatron_names(get_arch(config), config, te=False)
    assert "decoder.layers.1.mlp.experts.local_experts.7.linear_fc1.weight" in names
    assert not any(".mlp.linear_fc1." in n for n in names)
