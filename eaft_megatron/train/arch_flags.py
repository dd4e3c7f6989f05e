"""Megatron-LM flags from a Hugging Face config: the architecture (:func:`architecture_flags`),
the MoE training settings that follow the model (:func:`moe_training_flags`), and the fusions a
GPU without transformer-engine / apex must switch off (:func:`gpu_fallback_flags`).

For MoE models GLM's ``expert_bias`` update rate is megatron-core's default
``--moe-router-bias-update-rate`` 1e-3 (HF configs have no such field).
"""

from __future__ import annotations

from typing import Any

__all__ = ["architecture_flags", "gpu_fallback_flags", "moe_training_flags"]


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)  # repr: exact round trip


def architecture_flags(hf_config: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """(value flags, boolean flags) of Megatron-LM describing the HF architecture."""
    from ..models import gpt_model_kwargs, transformer_config_from_hf

    c = transformer_config_from_hf(hf_config, transformer_impl="local")
    kw = gpt_model_kwargs(hf_config)
    values = [
        ("--num-layers", c.num_layers),
        ("--hidden-size", c.hidden_size),
        ("--ffn-hidden-size", c.ffn_hidden_size),
        ("--num-attention-heads", c.num_attention_heads),
        ("--num-query-groups", c.num_query_groups),
        ("--kv-channels", c.kv_channels),
        ("--normalization", c.normalization),
        ("--norm-epsilon", float(c.layernorm_epsilon)),
        ("--position-embedding-type", "rope"),
        ("--rotary-base", kw["rotary_base"]),
        ("--rotary-percent", float(kw["rotary_percent"])),
        ("--max-position-embeddings", kw["max_sequence_length"]),
        ("--init-method-std", float(c.init_method_std)),
        ("--hidden-dropout", float(c.hidden_dropout)),
        ("--attention-dropout", float(c.attention_dropout)),
    ]
    switches = ["--group-query-attention", "--swiglu", "--disable-bias-linear"]
    if getattr(c, "multi_latent_attention", False):  # GLM-4.7-Flash: megatron's MLA
        switches[0] = "--multi-latent-attention"  # Megatron-LM: exclusive with GQA
        values += [("--kv-lora-rank", c.kv_lora_rank), ("--qk-head-dim", c.qk_head_dim),
                   ("--qk-pos-emb-head-dim", c.qk_pos_emb_head_dim),
                   ("--v-head-dim", c.v_head_dim), ("--rope-type", c.rope_type),
                   ("--rotary-scaling-factor", float(c.rotary_scaling_factor))]
        if c.q_lora_rank is not None:
            values.append(("--q-lora-rank", c.q_lora_rank))
    if c.add_qkv_bias:
        switches.append("--add-qkv-bias")
    if c.qk_layernorm:
        switches.append("--qk-layernorm")
    if c.rotary_interleaved:
        switches.append("--rotary-interleaved")
    if not kw["share_embeddings_and_output_weights"]:
        switches.append("--untie-embeddings-and-output-weights")
    if c.num_moe_experts:  # mixture of experts: megatron-core's MoE layer, as the HF router
        values += [
            ("--num-experts", c.num_moe_experts),
            ("--moe-router-topk", c.moe_router_topk),
            ("--moe-ffn-hidden-size", c.moe_ffn_hidden_size),
            ("--moe-router-score-function", c.moe_router_score_function),
            ("--moe-layer-freq", "[" + ",".join(map(str, c.moe_layer_freq)) + "]"),
        ]
        if c.moe_router_pre_softmax:
            switches.append("--moe-router-pre-softmax")
        if c.moe_shared_expert_intermediate_size:
            values.append(("--moe-shared-expert-intermediate-size",
                           c.moe_shared_expert_intermediate_size))
        if c.moe_shared_expert_gate:
            switches.append("--moe-shared-expert-gate")
        if c.moe_router_enable_expert_bias:
            switches.append("--moe-router-enable-expert-bias")
        if c.moe_router_num_groups:
            values += [("--moe-router-num-groups", c.moe_router_num_groups),
                       ("--moe-router-group-topk", c.moe_router_group_topk)]
        if c.moe_router_topk_scaling_factor:
            values.append(("--moe-router-topk-scaling-factor",
                           float(c.moe_router_topk_scaling_factor)))
    if c.experimental_attention_variant == "gated_delta_net":  # Qwen3.5: DeltaNet layers
        values += [
            ("--experimental-attention-variant", "gated_delta_net"),
            ("--linear-attention-freq", "[" + ",".join(map(str, c.linear_attention_freq)) + "]"),
            ("--linear-conv-kernel-dim", c.linear_conv_kernel_dim),
            ("--linear-key-head-dim", c.linear_key_head_dim),
            ("--linear-value-head-dim", c.linear_value_head_dim),
            ("--linear-num-key-heads", c.linear_num_key_heads),
            ("--linear-num-value-heads", c.linear_num_value_heads),
        ]
    if c.attention_output_gate:
        switches.append("--attention-output-gate")
    if c.layernorm_zero_centered_gamma:  # RMSNorm scaled by 1 + weight
        switches.append("--apply-layernorm-1p")
    return [(f, _fmt(v)) for f, v in values], switches


def moe_training_flags(hf_config: Any) -> list[tuple[str, str]]:
    """MoE training settings that follow the HF model unless the user sets them: the
    load-balancing loss (``router_aux_loss_coef``), the all-to-all token dispatcher, the
    router's dtype (fp32 where the HF router computes in fp32)."""
    from ..models.config import moe_config_from_hf

    moe = moe_config_from_hf(hf_config)
    if not moe:
        return []
    flags = [("--moe-router-load-balancing-type", moe["moe_router_load_balancing_type"]),
             ("--moe-aux-loss-coeff", _fmt(float(moe["moe_aux_loss_coeff"]))),
             ("--moe-token-dispatcher-type", moe["moe_token_dispatcher_type"])]
    if moe.get("moe_router_dtype"):
        flags.append(("--moe-router-dtype", moe["moe_router_dtype"]))
    return flags


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def gpu_fallback_flags(*, te_available: bool) -> list[str]:
    """On a GPU, Megatron-LM's defaults assume transformer-engine and apex: without TE the
    local spec and no rope fusion; without apex's CUDA extensions no gradient-accumulation
    fusion (fused_weight_gradient_mlp_cuda), masked-softmax fusion (scaled_masked_softmax_cuda)
    or persistent layer norm."""
    flags = [] if te_available else ["--transformer-impl local", "--no-rope-fusion"]
    if not _importable("fused_weight_gradient_mlp_cuda"):
        flags.append("--no-gradient-accumulation-fusion")
    if not _importable("scaled_masked_softmax_cuda"):
        flags.append("--no-masked-softmax-fusion")
    if not _importable("fast_layer_norm"):
        flags.append("--no-persist-layer-norm")
    return flags
