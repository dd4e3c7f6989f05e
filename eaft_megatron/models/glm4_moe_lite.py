"""Glm4MoeLiteForCausalLM (GLM-4.7-Flash): GLM-4.5's mixture of experts under multi-latent
attention (DeepSeek-V2 style) instead of grouped-query attention.

Attention (megatron-core's ``MLASelfAttention``, ``MLATransformerConfig``): queries through a
low-rank latent (``q_a_proj`` -> RMSNorm ``q_a_layernorm`` -> ``q_b_proj``), keys and values from one compressed latent
(``kv_a_proj_with_mqa`` = ``[latent (kv_lora_rank); shared rotary key (qk_rope_head_dim)]``,
RMSNorm ``kv_a_layernorm`` on the latent, ``kv_b_proj`` = per head ``[k_nope; v]``). Every
tensor keeps its layout: megatron's projections store the same rows in the same order (per head
``[nope; rope]`` queries, ``[k_nope; v]`` keys/values), and megatron splits ``kv_b_proj`` into
keys and values per head itself. Rotary: HF's ``rope_interleave=True`` (GLM-4.7-Flash)
rotates pairs (2i, 2i+1) and returns them de-interleaved, exactly what megatron's MLA does
(``mla_rotary_interleaved``), so no rows are permuted; ``rope_interleave=False`` is refused.
The latent norms use RMSNorm's default eps 1e-6 in transformers, not ``rms_norm_eps``; the
local layer spec builds them with 1e-6 (``layers.LATENT_NORM_EPS``).

MoE as GLM-4.5 (``glm4_moe.py``): sigmoid router with ``e_score_correction_bias``, grouped
top-k, routed scaling, shared experts; ``mlp_layer_types`` ("dense" / "sparse") says which
layers are MoE. Checkpoints store a multi-token-prediction layer after the last one
(``num_nextn_predict_layers``), carried through as for GLM-4.5.

Not supported: ``attention_bias=True`` (megatron's MLA down projections have no bias);
``q_lora_rank=None`` (one ``q_proj``: megatron-core 0.19 then wants a fused norm+linear for it,
a TransformerEngine module and a query norm transformers does not have; see ``config.py``).
"""

from __future__ import annotations

from typing import Any

from .common import EMBEDDING, FINAL_NORM, OUTPUT_LAYER, H, M
from .moe_common import DENSE_MLP, ROUTED_EXPERTS, ROUTER, shared_expert
from .spec import ArchSpec, MoESpec, Rename


def _mlp_layer_types(hf_config: Any) -> list[int]:
    """``mlp_layer_types`` ("dense" / "sparse" per layer) -> megatron ``moe_layer_freq``."""
    kinds = list(hf_config.mlp_layer_types)
    known = {"dense": 0, "sparse": 1}
    if len(kinds) != hf_config.num_hidden_layers or any(k not in known for k in kinds):
        raise ValueError(f"Glm4MoeLiteForCausalLM: mlp_layer_types={kinds!r} must list 'dense' "
                         f"or 'sparse' for each of the {hf_config.num_hidden_layers} layers")
    return [known[k] for k in kinds]


A = H + "self_attn."

GLM4_MOE_LITE = ArchSpec(
    hf_architecture="Glm4MoeLiteForCausalLM",
    mla=True,
    qk_layernorm=True,
    unsupported=(("attention_bias", "megatron-core's multi-latent attention has no bias on "
                                    "its down projections"),),
    moe=MoESpec(score_function="sigmoid", layer_pattern=_mlp_layer_types, expert_bias=True,
                grouped_topk=True, scaling_factor="routed_scaling_factor", router_fp32=True),
    extra_hf_layers="num_nextn_predict_layers",
    mappings=(
        EMBEDDING,
        Rename(M + "input_layernorm.weight", H + "input_layernorm.weight"),
        Rename(M + "self_attention.linear_q_down_proj.weight", A + "q_a_proj.weight",
               when="q_lora"),
        Rename(M + "self_attention.q_layernorm.weight", A + "q_a_layernorm.weight",
               when="q_lora"),
        Rename(M + "self_attention.linear_q_up_proj.weight", A + "q_b_proj.weight",
               when="q_lora"),
        Rename(M + "self_attention.linear_kv_down_proj.weight", A + "kv_a_proj_with_mqa.weight"),
        Rename(M + "self_attention.kv_layernorm.weight", A + "kv_a_layernorm.weight"),
        Rename(M + "self_attention.linear_kv_up_proj.weight", A + "kv_b_proj.weight"),
        Rename(M + "self_attention.linear_proj.weight", A + "o_proj.weight"),
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
