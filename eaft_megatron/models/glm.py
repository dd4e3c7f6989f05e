"""GlmForCausalLM (GLM-4-9B in transformers' format): q/k/v with bias (``attention_bias``),
a fused ``gate_up_proj`` that already is Megatron's ``[gate; up]``, and interleaved (GPT-J style)
rotary over the first half of each head (partial_rotary_factor 0.5 unless the config says)."""

from __future__ import annotations

from .common import EMBEDDING, FINAL_NORM, OUTPUT_LAYER, H, M
from .spec import ArchSpec, FusedQKV, Rename

GLM_LAYER = (
    Rename(M + "input_layernorm.weight", H + "input_layernorm.weight"),
    FusedQKV(M + "self_attention.linear_qkv.weight", q=H + "self_attn.q_proj.weight",
             k=H + "self_attn.k_proj.weight", v=H + "self_attn.v_proj.weight"),
    FusedQKV(M + "self_attention.linear_qkv.bias", q=H + "self_attn.q_proj.bias",
             k=H + "self_attn.k_proj.bias", v=H + "self_attn.v_proj.bias", when="qkv_bias"),
    Rename(M + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
    Rename(M + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
    # GlmMLP does gate, up = gate_up_proj(x).chunk(2): the same [gate; up] stacking as fc1.
    Rename(M + "mlp.linear_fc1.weight", H + "mlp.gate_up_proj.weight"),
    Rename(M + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
)

GLM = ArchSpec(
    hf_architecture="GlmForCausalLM",
    qkv_bias="attention_bias",
    rotary_interleaved=True,
    partial_rotary_factor=0.5,
    mappings=(EMBEDDING, *GLM_LAYER, FINAL_NORM, OUTPUT_LAYER),
)
