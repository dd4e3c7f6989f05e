"""Glm4MoeForCausalLM (GLM-4.5, GLM-4.6, GLM-4.7): the first ``first_k_dense_replace`` layers
dense, the others routed experts + ``n_shared_experts`` shared experts (one fused MLP of
``n_shared_experts x moe_intermediate_size``).

Router: sigmoid scores; the aux-loss-free bias ``e_score_correction_bias`` (megatron's
``expert_bias`` buffer, ``moe_router_enable_expert_bias``) shifts only the expert choice;
grouped top-k (``n_group`` / ``topk_group``); top-k scores renormalised (``norm_topk_prob``,
which megatron always does for sigmoid) and scaled by ``routed_scaling_factor``; logits in fp32.
Attention: q/k/v bias (``attention_bias``), optional q/k norms (``use_qk_norm``), half-split
rotary over the first ``partial_rotary_factor`` (0.5) of each head.

Multi-token prediction: the checkpoints store ``num_nextn_predict_layers`` extra decoder layers
after the last one (``model.layers.{num_hidden_layers + i}.*`` with ``eh_proj``, ``enorm``,
``hnorm``, ``shared_head.norm``), which transformers does not use. They are not part of the
Megatron model: the converter carries them through unchanged (``extra_hf_layers``).
"""

from __future__ import annotations

from .common import EMBEDDING, FINAL_NORM, OUTPUT_LAYER, H, M
from .moe_common import DENSE_MLP, ROUTED_EXPERTS, ROUTER, shared_expert
from .spec import ArchSpec, FusedQKV, MoESpec, Rename, _first_k_dense_layers

GLM4_MOE = ArchSpec(
    hf_architecture="Glm4MoeForCausalLM",
    qkv_bias="attention_bias",
    qk_layernorm="use_qk_norm",
    partial_rotary_factor=0.5,
    moe=MoESpec(score_function="sigmoid", layer_pattern=_first_k_dense_layers,
                expert_bias=True, grouped_topk=True, scaling_factor="routed_scaling_factor",
                router_fp32=True),
    extra_hf_layers="num_nextn_predict_layers",
    mappings=(
        EMBEDDING,
        Rename(M + "input_layernorm.weight", H + "input_layernorm.weight"),
        FusedQKV(M + "self_attention.linear_qkv.weight", q=H + "self_attn.q_proj.weight",
                 k=H + "self_attn.k_proj.weight", v=H + "self_attn.v_proj.weight"),
        FusedQKV(M + "self_attention.linear_qkv.bias", q=H + "self_attn.q_proj.bias",
                 k=H + "self_attn.k_proj.bias", v=H + "self_attn.v_proj.bias", when="qkv_bias"),
        Rename(M + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight",
               when="qk_layernorm"),
        Rename(M + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight",
               when="qk_layernorm"),
        Rename(M + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
        Rename(M + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
        *DENSE_MLP,
        ROUTER,
        Rename(M + "mlp.router.expert_bias", H + "mlp.gate.e_score_correction_bias", when="moe"),
        *ROUTED_EXPERTS,
        *shared_expert("shared_experts"),
        FINAL_NORM,
        OUTPUT_LAYER,
    ),
)
