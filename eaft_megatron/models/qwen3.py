"""Qwen3ForCausalLM: Qwen2 without q/k/v bias (unless ``attention_bias``) plus per-head
RMSNorm on queries and keys (q_norm / k_norm, size head_dim, which is not hidden/heads)."""

from __future__ import annotations

from .common import EMBEDDING, FINAL_NORM, OUTPUT_LAYER, H, M
from .spec import ArchSpec, FusedQKV, GatedMLP, Rename

QWEN3 = ArchSpec(
    hf_architecture="Qwen3ForCausalLM",
    qkv_bias="attention_bias",
    qk_layernorm=True,
    # attention_bias also gives o_proj a bias, which Megatron only has together with MLP
    # biases (add_bias_linear); no released Qwen3 sets it.
    unsupported=(("attention_bias", "o_proj bias has no Megatron equivalent without MLP bias"),),
    mappings=(
        EMBEDDING,
        Rename(M + "input_layernorm.weight", H + "input_layernorm.weight"),
        FusedQKV(M + "self_attention.linear_qkv.weight", q=H + "self_attn.q_proj.weight",
                 k=H + "self_attn.k_proj.weight", v=H + "self_attn.v_proj.weight"),
        FusedQKV(M + "self_attention.linear_qkv.bias", q=H + "self_attn.q_proj.bias",
                 k=H + "self_attn.k_proj.bias", v=H + "self_attn.v_proj.bias", when="qkv_bias"),
        Rename(M + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight"),
        Rename(M + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight"),
        Rename(M + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
        Rename(M + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
        GatedMLP(M + "mlp.linear_fc1.weight", gate=H + "mlp.gate_proj.weight",
                 up=H + "mlp.up_proj.weight"),
        Rename(M + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
        FINAL_NORM,
        OUTPUT_LAYER,
    ),
)
