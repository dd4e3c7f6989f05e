"""Qwen3MoeForCausalLM: Qwen3's attention (q/k norms, no bias) with routed experts only.

Router: softmax over all experts, then top-k (``num_experts_per_tok``); ``norm_topk_prob``
renormalises the k probabilities, which is megatron's softmax over the top-k logits
(``moe_router_pre_softmax=False``), otherwise megatron's pre-softmax. Layers listed in
``mlp_only_layers`` or off the ``decoder_sparse_step`` grid keep a dense MLP
(``moe_layer_freq`` list).
"""

from __future__ import annotations

from .common import EMBEDDING, FINAL_NORM, OUTPUT_LAYER, H, M
from .moe_common import DENSE_MLP, ROUTED_EXPERTS, ROUTER
from .spec import ArchSpec, FusedQKV, MoESpec, Rename

ATTENTION = (
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
)

QWEN3_MOE = ArchSpec(
    hf_architecture="Qwen3MoeForCausalLM",
    qkv_bias="attention_bias",
    qk_layernorm=True,
    unsupported=(("attention_bias", "o_proj bias has no Megatron equivalent without MLP bias"),),
    moe=MoESpec(score_function="softmax"),
    mappings=(
        EMBEDDING,
        *ATTENTION,
        *DENSE_MLP,
        ROUTER,
        *ROUTED_EXPERTS,
        FINAL_NORM,
        OUTPUT_LAYER,
    ),
)
