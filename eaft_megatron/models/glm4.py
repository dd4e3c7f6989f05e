"""Glm4ForCausalLM (GLM-4-0414): GLM-4 plus "sandwich" norms, an RMSNorm on the attention
output (post_self_attn_layernorm) and on the MLP output (post_mlp_layernorm), each applied
before its residual add (``layers.SandwichNormTransformerLayer``)."""

from __future__ import annotations

from .common import EMBEDDING, FINAL_NORM, OUTPUT_LAYER, H, M
from .glm import GLM_LAYER
from .spec import ArchSpec, Rename

GLM4 = ArchSpec(
    hf_architecture="Glm4ForCausalLM",
    qkv_bias="attention_bias",
    sandwich_norms=True,
    rotary_interleaved=True,
    partial_rotary_factor=0.5,
    mappings=(
        EMBEDDING,
        *GLM_LAYER,
        Rename(M + "post_self_attn_layernorm.weight", H + "post_self_attn_layernorm.weight"),
        Rename(M + "post_mlp_layernorm.weight", H + "post_mlp_layernorm.weight"),
        FINAL_NORM,
        OUTPUT_LAYER,
    ),
)
