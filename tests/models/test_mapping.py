"""HF <-> Megatron name and layout mapping, and the HF config -> Megatron config mapping, on
tiny random HF models (no process groups; the Megatron models themselves are in
test_megatron_models.py).

    python -m pytest -q tests/models/test_mapping.py
"""

from __future__ import annotations

import types
from collections import Counter

import pytest
import torch

from eaft_megatron.models import (
    ARCHITECTURES,
    check_config_matches,
    check_parallel_sizes,
    get_arch,
    gpt_model_kwargs,
    hf_names,
    hf_to_megatron,
    megatron_names,
    megatron_shapes,
    megatron_to_hf,
    padded_vocab_size,
    rope_from_hf,
    transformer_config_from_hf,
)

from tests.support.tiny_models import CASES, build


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return (request.param, *build(request.param))


@pytest.mark.parametrize("te", [False, True])
def test_round_trip_is_bit_exact_and_consumes_every_tensor(case, te):
    name, config, _, hf_state = case
    arch = get_arch(config)
    padded = padded_vocab_size(config.vocab_size, 2)
    assert sorted(hf_names(arch, config)) == sorted(hf_state)  # nothing missing, nothing extra
    reads = Counter()

    def get_hf(n):
        reads[n] += 1
        return hf_state[n]

    megatron = dict(hf_to_megatron(arch, config, get_hf, padded_vocab=padded, te=te))
    assert reads == Counter(hf_state.keys())  # every HF tensor read exactly once
    assert list(megatron) == megatron_names(arch, config, te=te)
    shapes = megatron_shapes(arch, config, padded_vocab=padded, te=te)
    assert {k: tuple(v.shape) for k, v in megatron.items()} == shapes
    assert megatron["embedding.word_embeddings.weight"].shape[0] == padded
    assert ("output_layer.weight" in megatron) == (not config.tie_word_embeddings)
    layer0 = {k for k in megatron if k.startswith("decoder.layers.0.")}
    assert ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in layer0) == te
    assert ("decoder.layers.0.input_layernorm.weight" in layer0) == (not te)

    back = dict(megatron_to_hf(arch, config, megatron.__getitem__, te=te))
    assert list(back) == hf_names(arch, config)
    for n, t in hf_state.items():
        assert torch.equal(back[n], t), n
        assert back[n].dtype == t.dtype


def test_megatron_names_per_architecture():
    """One layer of each table, spelled out: what the converter and trainer will see."""
    attn = ["input_layernorm.weight", "self_attention.linear_qkv.weight",
            "self_attention.linear_qkv.bias", "self_attention.linear_proj.weight",
            "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    qwen3 = ["input_layernorm.weight", "self_attention.linear_qkv.weight",
             "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
             "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight",
             "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    expected = {
        "qwen2": attn, "qwen2_tied": attn, "glm": attn, "qwen3": qwen3,
        "glm4": attn + ["post_self_attn_layernorm.weight", "post_mlp_layernorm.weight"],
    }
    for case, layer in expected.items():
        config = CASES[case]()
        names = megatron_names(get_arch(config), config, te=False)
        assert [n[len("decoder.layers.1."):] for n in names
                if n.startswith("decoder.layers.1.")] == layer, case
        head = ["decoder.final_layernorm.weight"] + (
            [] if config.tie_word_embeddings else ["output_layer.weight"])
        assert names[0] == "embedding.word_embeddings.weight" and names[-len(head):] == head


def test_config_mapping(case):
    name, config, _, _ = case
    mc = transformer_config_from_hf(config, transformer_impl="local")
    head_dim = {"qwen3": 24, "glm4": 32}.get(name, 16)
    assert (mc.num_layers, mc.hidden_size, mc.ffn_hidden_size) == (2, 64, 96)
    assert (mc.num_attention_heads, mc.num_query_groups, mc.kv_channels) == (4, 2, head_dim)
    assert mc.normalization == "RMSNorm" and mc.layernorm_epsilon == config.rms_norm_eps
    assert mc.gated_linear_unit and not mc.add_bias_linear
    assert mc.add_qkv_bias == (name != "qwen3")
    assert mc.qk_layernorm == (name == "qwen3")
    assert mc.rotary_interleaved == name.startswith("glm")
    assert mc.hidden_dropout == 0.0 and mc.attention_dropout == 0.0
    kw = gpt_model_kwargs(config, tp=2)
    assert kw["vocab_size"] == padded_vocab_size(config.vocab_size, 2)
    assert kw["rotary_percent"] == {"glm": 0.5, "glm4": 0.25}.get(name, 1.0)
    assert kw["rotary_base"] == config.rope_parameters["rope_theta"]
    assert kw["share_embeddings_and_output_weights"] == config.tie_word_embeddings
    assert kw["position_embedding_type"] == "rope"
    assert kw["max_sequence_length"] == 64
    check_config_matches(config, mc)


def test_config_overrides_and_mismatch():
    config = CASES["glm4"]()
    mc = transformer_config_from_hf(config, transformer_impl="local",
                                    tensor_model_parallel_size=2, params_dtype=torch.bfloat16,
                                    pipeline_model_parallel_size=2, bf16=True)
    assert mc.tensor_model_parallel_size == 2 and mc.pipeline_dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\['kv_channels'\] are read from the HF config"):
        transformer_config_from_hf(config, kv_channels=8)
    mc.rotary_interleaved = False  # e.g. a config made from Megatron-LM defaults
    mc.kv_channels = 16
    with pytest.raises(ValueError, match=r"kv_channels=16 \(HF config: 32\).*rotary_interleaved"):
        check_config_matches(config, mc)


def test_transformers_4_style_config():
    """transformers < 5 keeps rope_theta / partial_rotary_factor as attributes; GLM json may
    omit partial_rotary_factor (model default 0.5)."""
    glm = types.SimpleNamespace(architectures=["GlmForCausalLM"], rope_theta=10000.0)
    assert rope_from_hf(glm) == (10000.0, 0.5)
    glm.partial_rotary_factor = 0.25
    assert rope_from_hf(glm) == (10000.0, 0.25)
    qwen = types.SimpleNamespace(architectures=["Qwen2ForCausalLM"], rope_theta=1e6,
                                 rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        rope_from_hf(qwen)


def test_errors():
    config = CASES["qwen2"]()
    config.architectures = ["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="unsupported architecture 'LlamaForCausalLM'.*"
                       "Glm4ForCausalLM, Glm4MoeForCausalLM, Glm4MoeLiteForCausalLM, "
                       "GlmForCausalLM, Qwen2ForCausalLM, "
                       "Qwen2MoeForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM"):
        get_arch(config)
    assert {"Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"} <= set(ARCHITECTURES)

    config = CASES["qwen2"]()
    with pytest.raises(ValueError, match="tensor parallel size 4 does not divide "
                       r"num_key_value_heads \(query groups\)=2"):
        check_parallel_sizes(config, 4, 1)
    with pytest.raises(ValueError, match="tensor parallel size 3 does not divide "
                       "num_attention_heads=4"):
        transformer_config_from_hf(config, tensor_model_parallel_size=3)
    with pytest.raises(ValueError, match="pipeline parallel size 3 does not divide "
                       "num_hidden_layers=2"):
        check_parallel_sizes(config, 1, 3)
    check_parallel_sizes(config, 2, 2)

    qwen3 = CASES["qwen3"]()
    qwen3.attention_bias = True
    with pytest.raises(ValueError, match="attention_bias=True is not supported: o_proj bias"):
        transformer_config_from_hf(qwen3)


def test_shape_errors_name_tensor_and_shapes():
    config, _, hf_state = build("glm")
    arch = get_arch(config)
    bad = dict(hf_state)
    bad["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    with pytest.raises(ValueError, match=r"HF tensor 'model.layers.1.self_attn.k_proj.weight' "
                       r"has shape \(16, 64\), expected \(32, 64\) \(for Megatron "
                       r"'decoder.layers.1.self_attention.linear_qkv.weight'\)"):
        list(hf_to_megatron(arch, config, bad.__getitem__, padded_vocab=384, te=False))
    megatron = dict(hf_to_megatron(arch, config, hf_state.__getitem__, padded_vocab=384, te=False))
    megatron["decoder.layers.0.mlp.linear_fc2.weight"] = torch.zeros(64, 95)
    with pytest.raises(ValueError, match=r"'decoder.layers.0.mlp.linear_fc2.weight' has shape "
                       r"\(64, 95\), expected \(64, 96\)"):
        list(megatron_to_hf(arch, config, megatron.__getitem__, te=False))
    megatron = dict(hf_to_megatron(arch, config, hf_state.__getitem__, padded_vocab=384, te=False))
    megatron["output_layer.weight"] = torch.zeros(299, 64)
    with pytest.raises(ValueError, match=r"'output_layer.weight' has shape \(299, 64\), "
                       r"expected \(>= 300, 64\)"):
        list(megatron_to_hf(arch, config, megatron.__getitem__, te=False))
    with pytest.raises(ValueError, match="padded_vocab=256 < vocab_size=300"):
        list(hf_to_megatron(arch, config, hf_state.__getitem__, padded_vocab=256))


def test_layer_spec_choice():
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from eaft_megatron.models import layer_spec, te_available
    from eaft_megatron.models.layers import SandwichNormTransformerLayer

    glm4, qwen3 = get_arch(CASES["glm4"]()), get_arch(CASES["qwen3"]())
    spec = layer_spec(glm4, te=False)
    assert spec.module is SandwichNormTransformerLayer
    assert spec.submodules.post_self_attn_layernorm is spec.submodules.input_layernorm
    assert layer_spec(qwen3, te=False).module is TransformerLayer
    attention = layer_spec(qwen3, te=False).submodules.self_attention.submodules
    assert attention.q_layernorm is not IdentityOp and attention.k_layernorm is not IdentityOp
    if not te_available():
        with pytest.raises(ImportError, match="te=True needs transformer-engine"):
            layer_spec(qwen3, te=True)
