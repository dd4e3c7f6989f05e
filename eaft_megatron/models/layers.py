"""Megatron-Core layer specs for the supported architectures, and GLM-4-0414's sandwich norms.

``layer_spec(arch, te=False)`` is megatron's own GPT layer spec (local modules, or
TransformerEngine ones with ``te=True``) with Qwen3's q/k norms switched on, and for
GLM-4-0414 (``arch.sandwich_norms``) the :class:`SandwichNormTransformerLayer` below. Multi-latent
attention (GLM-4.7-Flash, ``arch.mla``) is megatron's ``MLASelfAttention``, locally with
:class:`LatentAttentionCore` (megatron's local core attention rejects MLA's arguments). Local MoE
layers keep TransformerEngine's checkpoint name for their pre-MLP norm (:func:`moe_layer_keys`).

Parameter names of the two extra norms, per layer (local and TE specs alike)::

    decoder.layers.{i}.post_self_attn_layernorm.weight   # HF: post_self_attn_layernorm
    decoder.layers.{i}.post_mlp_layernorm.weight         # HF: post_mlp_layernorm
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from .spec import ArchSpec

__all__ = ["LatentAttentionCore", "SandwichNormLayerSubmodules", "SandwichNormTransformerLayer",
           "block_spec", "layer_spec"]


@dataclasses.dataclass
class SandwichNormLayerSubmodules(TransformerLayerSubmodules):
    """``TransformerLayerSubmodules`` plus the two output norms (norm builders, like
    ``input_layernorm``; ``IdentityOp`` leaves the layer standard)."""

    post_self_attn_layernorm: Any = IdentityOp
    post_mlp_layernorm: Any = IdentityOp


def _norm_then(bias_dropout_add: Callable, norm: Callable) -> Callable:
    """A bias-dropout-add that first normalises the sublayer output (bias folded in)."""

    def apply(x_with_bias, residual, prob):
        x, bias = x_with_bias
        if bias is not None:
            x = x + bias
        return bias_dropout_add((norm(x), None), residual, prob)

    return apply


class SandwichNormTransformerLayer(TransformerLayer):
    """A ``TransformerLayer`` that normalises the attention and MLP outputs before the residual
    adds, as HF's ``Glm4DecoderLayer``::

        h = x + post_self_attn_layernorm(attention(input_layernorm(x)))
        y = h + post_mlp_layernorm(mlp(pre_mlp_layernorm(h)))

    The norms are applied inside ``self_attn_bda`` / ``mlp_bda`` (the bias-dropout-add that
    megatron calls with the sublayer output and the residual), so megatron's forward, recompute
    and offloading paths are reused unchanged. Megatron's fused-TP inference kernel adds the
    residual inside ``linear_proj`` and skips the bias-dropout-add, so it is rejected.
    """

    def __init__(self, config, submodules: SandwichNormLayerSubmodules, *args, **kwargs):
        if getattr(config, "inference_fuse_tp_communication", False):
            raise ValueError(
                "inference_fuse_tp_communication=True skips the bias-dropout-add where "
                "SandwichNormTransformerLayer applies its output norms"
            )
        super().__init__(config, submodules, *args, **kwargs)
        norm_kwargs = dict(config=self.config, hidden_size=self.config.hidden_size,
                           eps=self.config.layernorm_epsilon)
        self.post_self_attn_layernorm = submodules.post_self_attn_layernorm(**norm_kwargs)
        self.post_mlp_layernorm = submodules.post_mlp_layernorm(**norm_kwargs)
        # The parent stored its bias-dropout-add builders as instance attributes; move them
        # aside so the methods below, which wrap them, are what the parent's forward calls.
        self._inner_self_attn_bda = self.__dict__.pop("self_attn_bda")
        self._inner_mlp_bda = self.__dict__.pop("mlp_bda")

    def self_attn_bda(self, training: bool, fused: bool) -> Callable:
        return _norm_then(self._inner_self_attn_bda(training, fused),
                          self.post_self_attn_layernorm)

    def mlp_bda(self, training: bool, fused: bool) -> Callable:
        return _norm_then(self._inner_mlp_bda(training, fused), self.post_mlp_layernorm)


class LatentAttentionCore(DotProductAttention):
    """Megatron's local core attention for multi-latent attention.

    megatron-core 0.19's ``MLASelfAttention`` builds its core attention with ``k_channels`` /
    ``v_channels`` (query/key and value heads differ in size), which only TransformerEngine's
    core attention accepts: with megatron's own local spec it fails with ``TypeError:
    DotProductAttention.__init__() got an unexpected keyword argument 'k_channels'``. The local
    one takes the query/key head size from the tensors, reshapes the context by
    ``kv_channels`` (the config sets it to the value head size) and gets MLA's softmax scale
    passed in; so the two sizes are checked here and not passed on.
    """

    def __init__(self, config, *args, k_channels=None, v_channels=None, **kwargs):
        if v_channels is not None and v_channels != config.kv_channels:
            raise ValueError(f"kv_channels={config.kv_channels} must be the value head size "
                             f"{v_channels} for multi-latent attention's local core")
        super().__init__(config, *args, **kwargs)


# The local multi-latent attention spec saves its norms under the names TransformerEngine's
# spec gives them (latent norms fused into the up projections, the dense pre-MLP norm into
# linear_fc1), as megatron's own local spec does for the other attention.
_MLA_LOCAL_KEYS_MAP = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
}


def _mla_submodules(*, te: bool, moe: dict, q_lora: bool):
    """Megatron's MLA layer submodules; locally with :class:`LatentAttentionCore`, the
    q/kv latent norms at HF's eps (1e-6, see ``glm4_moe_lite.py``) and TE checkpoint names."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_submodules,
        get_gpt_layer_with_transformer_engine_submodules,
    )

    if te:
        return get_gpt_layer_with_transformer_engine_submodules(
            qk_layernorm=True, multi_latent_attention=True, **moe)
    sub = get_gpt_layer_local_submodules(qk_layernorm=True, multi_latent_attention=True,
                                         normalization="RMSNorm", **moe)
    attn = sub.self_attention.submodules
    attn.core_attention = LatentAttentionCore
    # without a query latent there is no query norm (megatron rejects one)
    attn.q_layernorm = _fixed_eps(attn.q_layernorm, LATENT_NORM_EPS) if q_lora else IdentityOp
    attn.kv_layernorm = _fixed_eps(attn.kv_layernorm, LATENT_NORM_EPS)
    keys = dict(_MLA_LOCAL_KEYS_MAP)
    if not moe:
        keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    sub.sharded_state_dict_keys_map = keys
    return sub


LATENT_NORM_EPS = 1e-6
"""HF's q_a_layernorm / kv_a_layernorm use the RMSNorm default eps, not ``rms_norm_eps``."""


def _fixed_eps(norm: Any, eps: float) -> Callable:
    """A norm builder that ignores the config's eps (megatron passes ``layernorm_epsilon``)."""

    def build(*args, **kwargs):
        kwargs["eps"] = eps
        return norm(*args, **kwargs)

    return build


def moe_layer_keys(keys_map: dict[str, str]) -> dict[str, str]:
    """A local spec's checkpoint-name map for a MoE layer. megatron's local spec stores the
    pre-MLP norm as ``mlp.linear_fc1.layer_norm_weight`` (where TransformerEngine fuses it) in
    every layer, but TransformerEngine's MoE layers keep it a separate ``pre_mlp_layernorm``
    (no fused linear follows it): without this, a MoE checkpoint saved on one path misses that
    norm on the other."""
    return {k: v for k, v in keys_map.items() if k != "pre_mlp_layernorm."}


def layer_spec(arch: ArchSpec, *, te: bool, num_experts: int | None = None,
               qk_layernorm: bool | None = None, q_lora: bool = True) -> ModuleSpec:
    """The transformer layer spec for ``arch``: TransformerEngine modules if ``te`` (input and
    pre-MLP norms fused into ``linear_qkv`` / ``linear_fc1``), else megatron's local modules.
    ``num_experts``: megatron's own MoE layer (router, ``SequentialMLP`` experts, shared
    experts when the config asks for them) instead of the dense MLP. Multi-latent attention
    (``arch.mla``): megatron's MLA layer, with a query latent unless ``q_lora`` is False."""
    moe = dict(num_experts=num_experts, moe_grouped_gemm=False) if num_experts else {}
    if qk_layernorm is None:  # a constant of the architecture (per config: pass it)
        if isinstance(arch.qk_layernorm, str):
            raise ValueError(f"{arch.hf_architecture}: pass qk_layernorm (decided per config)")
        qk_layernorm = arch.qk_layernorm
    if te:
        from .config import te_available

        if not te_available():
            raise ImportError(
                "te=True needs transformer-engine (megatron.core.extensions.transformer_engine"
                ".HAVE_TE is False); use transformer_impl='local'"
            )
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_submodules,
        )

        if arch.mla:
            sub = _mla_submodules(te=True, moe=moe, q_lora=q_lora)
        else:
            sub = get_gpt_layer_with_transformer_engine_submodules(qk_layernorm=qk_layernorm,
                                                                   **moe)
        norm = TESpecProvider().layer_norm(rms_norm=True)
    else:
        from megatron.core.models.backends import LocalSpecProvider
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules

        if arch.mla:
            sub = _mla_submodules(te=False, moe=moe, q_lora=q_lora)
        else:
            sub = get_gpt_layer_local_submodules(qk_layernorm=qk_layernorm,
                                                 normalization="RMSNorm", **moe)
            if num_experts:
                sub.sharded_state_dict_keys_map = moe_layer_keys(sub.sharded_state_dict_keys_map)
        norm = LocalSpecProvider().layer_norm(rms_norm=True)
    if not arch.sandwich_norms:
        return ModuleSpec(module=TransformerLayer, submodules=sub)
    fields = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)}
    return ModuleSpec(
        module=SandwichNormTransformerLayer,
        submodules=SandwichNormLayerSubmodules(
            **fields, post_self_attn_layernorm=norm, post_mlp_layernorm=norm
        ),
    )


def block_spec(arch: ArchSpec, config: Any, *, te: bool, vp_stage: int | None = None,
               pp_rank: int | None = None):
    """What ``GPTModel`` takes as its layer spec: for dense architectures :func:`layer_spec`;
    for MoE ones a ``TransformerBlockSubmodules`` with this pipeline stage's layers, a MoE layer
    where ``config.moe_layer_freq`` says 1 and the dense layer elsewhere (as megatron's
    ``get_gpt_decoder_block_spec``, whose local variant lacks the RMSNorm choice here).
    Gated-DeltaNet hybrids: :func:`.hybrid.hybrid_block_spec`."""
    if arch.linear_attention:
        from .hybrid import hybrid_block_spec

        return hybrid_block_spec(config, te=te, vp_stage=vp_stage, pp_rank=pp_rank)
    qk = bool(config.qk_layernorm)
    q_lora = getattr(config, "q_lora_rank", None) is not None
    if arch.moe is None or not config.num_moe_experts:
        return layer_spec(arch, te=te, qk_layernorm=qk, q_lora=q_lora)
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    dense = layer_spec(arch, te=te, qk_layernorm=qk, q_lora=q_lora)
    moe = layer_spec(arch, te=te, num_experts=config.num_moe_experts, qk_layernorm=qk,
                     q_lora=q_lora)
    pattern = config.moe_layer_freq
    if isinstance(pattern, int):
        pattern = [int(i % pattern == 0) for i in range(config.num_layers)]
    specs = [moe if p else dense for p in pattern]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        norm = TESpecProvider().layer_norm(rms_norm=True, for_qk=False)
    else:
        from megatron.core.models.backends import LocalSpecProvider

        norm = LocalSpecProvider().layer_norm(rms_norm=True, for_qk=False)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + count], layer_norm=norm)
