"""Qwen3_5ForCausalLM and Qwen3_5ForConditionalGeneration (Qwen3.5 dense): a gated-DeltaNet
hybrid. ``layer_types`` makes most layers (three of every four in the released models) gated
DeltaNet linear attention (megatron-core's ``GatedDeltaNet``: one input projection to q, k, v,
the output gate z and the per-head b / a, a causal depthwise convolution over q, k, v, the
chunked gated delta rule with decay ``A_log`` / ``dt_bias``, a gated RMSNorm, ``out_proj``) and
the rest gated full attention (q_proj also yields a sigmoid gate per head, q/k norms, rotary on
the first ``partial_rotary_factor`` = 0.25 of each head). Every RMSNorm but the DeltaNet's gated
one scales by ``1 + weight`` (megatron's ``layernorm_zero_centered_gamma``). The MLP is Qwen3's.

The vision-language checkpoints keep the language model under ``model.language_model.`` and
its config in ``text_config``; text SFT converts and trains the language model, the vision tower
(``model.visual.``) and the multi-token-prediction head (``mtp.``, which transformers does not
use) are carried through unchanged and written back on export. With text-only positions the
three M-RoPE position streams are equal, so M-RoPE is plain rotary.
"""

from __future__ import annotations

import dataclasses

from .common import EMBEDDING, FINAL_NORM, OUTPUT_LAYER, H, M
from .spec import ArchSpec, DeltaNetInProj, FusedQKVGate, GatedMLP, Mapping, Rename

# Full-attention layers (when="attention"): gated attention with q/k norms.
GATED_ATTENTION = (
    FusedQKVGate(M + "self_attention.linear_qkv.weight", q=H + "self_attn.q_proj.weight",
                 k=H + "self_attn.k_proj.weight", v=H + "self_attn.v_proj.weight",
                 when="attention"),
    Rename(M + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight",
           when="attention"),
    Rename(M + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight",
           when="attention"),
    Rename(M + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight",
           when="attention"),
)

# Gated-DeltaNet layers (when="linear"): the tensors besides in_proj are the same on both sides.
DELTANET = (
    Rename(M + "self_attention.conv1d.weight", H + "linear_attn.conv1d.weight", when="linear"),
    Rename(M + "self_attention.A_log", H + "linear_attn.A_log", when="linear"),
    Rename(M + "self_attention.dt_bias", H + "linear_attn.dt_bias", when="linear"),
    Rename(M + "self_attention.out_norm.weight", H + "linear_attn.norm.weight", when="linear"),
    Rename(M + "self_attention.out_proj.weight", H + "linear_attn.out_proj.weight",
           when="linear"),
)

QWEN3_5 = ArchSpec(
    hf_architecture="Qwen3_5ForCausalLM",
    qk_layernorm=True,
    partial_rotary_factor=0.25,
    linear_attention=True,
    attention_output_gate=True,
    zero_centered_norms=True,
    extra_hf_prefixes=("mtp.",),
    # attention_bias would give q/k/v and o_proj biases; o_proj's has no Megatron equivalent
    # without MLP biases, and no released Qwen3.5 sets it.
    unsupported=(("attention_bias", "o_proj bias has no Megatron equivalent without MLP bias"),),
    mappings=(
        EMBEDDING,
        Rename(M + "input_layernorm.weight", H + "input_layernorm.weight"),
        *GATED_ATTENTION,
        DeltaNetInProj(M + "self_attention.in_proj.weight",
                       qkv=H + "linear_attn.in_proj_qkv.weight",
                       z=H + "linear_attn.in_proj_z.weight",
                       b=H + "linear_attn.in_proj_b.weight",
                       a=H + "linear_attn.in_proj_a.weight", when="linear"),
        *DELTANET,
        Rename(M + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
        GatedMLP(M + "mlp.linear_fc1.weight", gate=H + "mlp.gate_proj.weight",
                 up=H + "mlp.up_proj.weight"),
        Rename(M + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
        FINAL_NORM,
        OUTPUT_LAYER,
    ),
)


def language_model_of(arch: ArchSpec, hf_architecture: str, *,
                      prefix: str = "model.language_model.",
                      carried: tuple[str, ...] = ("model.visual.",)) -> ArchSpec:
    """The vision-language variant of a text architecture: the same table with the HF names
    moved from ``model.`` to ``prefix`` (``lm_head`` stays), the language model's config in
    ``text_config``, and the ``carried`` tensors passed through."""

    def move(m: Mapping) -> Mapping:
        names = {f: (prefix + getattr(m, f).removeprefix("model.")
                     if getattr(m, f).startswith("model.") else getattr(m, f))
                 for f in m.hf_fields}
        return dataclasses.replace(m, **names)

    return dataclasses.replace(
        arch, hf_architecture=hf_architecture, mappings=tuple(move(m) for m in arch.mappings),
        text_config="text_config", extra_hf_prefixes=(*carried, *arch.extra_hf_prefixes))


QWEN3_5_VL = language_model_of(QWEN3_5, "Qwen3_5ForConditionalGeneration")
