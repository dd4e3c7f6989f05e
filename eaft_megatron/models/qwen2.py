"""Qwen2ForCausalLM (Qwen2, Qwen2.5): q/k/v always with bias, o_proj without; SwiGLU from
separate gate/up; RMSNorm; full half-split rotary."""

from __future__ import annotations

from .common import EMBEDDING, FINAL_NORM, OUTPUT_LAYER, H, M
from .spec import ArchSpec, FusedQKV, GatedMLP, Rename

QWEN2 = ArchSpec(
    hf_architecture="Qwen2ForCausalLM",
    qkv_bias=True,  # hard-wired in Qwen2Attention, not a config field
    mappings=(
        EMBEDDING,
        Rename(M + "input_layernorm.weight", H + "input_layernorm.weight"),
        FusedQKV(M + "self_attention.linear_qkv.weight", q=H + "self_attn.q_proj.weight",
                 k=H + "self_attn.k_proj.weight", v=H + "self_attn.v_proj.weight"),
        FusedQKV(M + "self_attention.linear_qkv.bias", q=H + "self_attn.q_proj.bias",
                 k=H + "self_attn.k_proj.bias", v=H + "self_attn.v_proj.bias"),
        Rename(M + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
        Rename(M + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
        GatedMLP(M + "mlp.linear_fc1.weight", gate=H + "mlp.gate_proj.weight",
                 up=H + "mlp.up_proj.weight"),
        Rename(M + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
        FINAL_NORM,
        OUTPUT_LAYER,
    ),
)
