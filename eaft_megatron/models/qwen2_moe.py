"""Qwen2MoeForCausalLM (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v bias) with
routed experts plus one always-on shared expert scaled by a sigmoid gate
(``shared_expert_gate`` [1, h] -> megatron ``moe_shared_expert_gate``). Router and dense-layer
rules as Qwen3-MoE (``qwen3_moe.py``)."""

from __future__ import annotations

from .common import EMBEDDING, FINAL_NORM, OUTPUT_LAYER, H, M
from .moe_common import DENSE_MLP, ROUTED_EXPERTS, ROUTER, shared_expert
from .spec import ArchSpec, FusedQKV, MoESpec, Rename

QWEN2_MOE = ArchSpec(
    hf_architecture="Qwen2MoeForCausalLM",
    qkv_bias="qkv_bias",
    moe=MoESpec(score_function="softmax", shared_expert_gate=True),
    mappings=(
        EMBEDDING,
        Rename(M + "input_layernorm.weight", H + "input_layernorm.weight"),
        FusedQKV(M + "self_attention.linear_qkv.weight", q=H + "self_attn.q_proj.weight",
                 k=H + "self_attn.k_proj.weight", v=H + "self_attn.v_proj.weight"),
        FusedQKV(M + "self_attention.linear_qkv.bias", q=H + "self_attn.q_proj.bias",
                 k=H + "self_attn.k_proj.bias", v=H + "self_attn.v_proj.bias", when="qkv_bias"),
        Rename(M + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
        Rename(M + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
        *DENSE_MLP,
        ROUTER,
        *ROUTED_EXPERTS,
        *shared_expert("shared_expert"),
        Rename(M + "mlp.shared_experts.gate_weight", H + "mlp.shared_expert_gate.weight",
               when="moe"),
        FINAL_NORM,
        OUTPUT_LAYER,
    ),
)
