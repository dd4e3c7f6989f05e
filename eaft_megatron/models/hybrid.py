"""Layer specs of the gated-DeltaNet hybrids (Qwen3.5): megatron-core's own ``GatedDeltaNet``
and gated ``SelfAttention`` layers in the order of ``config.linear_attention_freq``.

megatron-core builds these blocks only with TransformerEngine
(``get_transformer_block_with_experimental_attention_variant_spec`` asserts
``transformer_impl == "transformer_engine"``), and its local RMSNorm (``WrappedTorchNorm``,
``torch.nn.RMSNorm``) refuses ``layernorm_zero_centered_gamma``. So the local spec here is the
same layer list built from megatron's local modules, with :class:`ZeroCenteredRMSNorm` for the
``1 + weight`` norms; the TransformerEngine spec takes megatron's TE modules, whose norms honour
``layernorm_zero_centered_gamma`` themselves. In both, the DeltaNet's gated output norm
(``out_norm``) is a plain RMSNorm, as in Hugging Face's ``Qwen3_5RMSNormGated`` (weight
initialised to one), so its weight converts unchanged.

Checkpoint names: the DeltaNet layer's input norm is stored as
``self_attention.in_proj.layer_norm_weight`` (TE fuses it into ``in_proj``; the local spec maps
its ``input_layernorm`` there), a full-attention layer's as megatron's
``self_attention.linear_qkv.layer_norm_weight``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

__all__ = ["ZeroCenteredRMSNorm", "hybrid_block_spec"]


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm scaling by ``1 + weight`` (weight initialised to zero), computed in fp32 and
    returned in the input dtype, as Hugging Face's ``Qwen3_5RMSNorm``. A megatron norm builder
    (``config=, hidden_size=, eps=``); local spec only, without sequence parallelism (as
    megatron's own ``WrappedTorchNorm``)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **kwargs: Any):
        super().__init__()
        if getattr(config, "sequence_parallel", False):
            raise ValueError("ZeroCenteredRMSNorm (local spec) does not support sequence "
                             "parallelism; use transformer_impl='transformer_engine'")
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.zeros(hidden_size, dtype=config.params_dtype,
                        device="cpu" if config.use_cpu_initialization else None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class _PlainTENorm:
    """TransformerEngine's RMSNorm with ``layernorm_zero_centered_gamma`` off whatever the config
    says (the DeltaNet's gated output norm scales by ``weight``, not ``1 + weight``). A class,
    not a function: megatron's ``build_module`` returns plain functions unbuilt."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-6, **kwargs: Any):
        from megatron.core.extensions.transformer_engine import TENorm

        if config.layernorm_zero_centered_gamma:
            config = copy.copy(config)
            config.layernorm_zero_centered_gamma = False
        return TENorm(config=config, hidden_size=hidden_size, eps=eps, **kwargs)


class _LocalRMSNorm:
    """``torch.nn.RMSNorm`` for the local spec whatever ``layernorm_zero_centered_gamma`` says
    (megatron's ``WrappedTorchNorm`` refuses that flag)."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-6, **kwargs: Any):
        return torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype,
                                device="cpu" if config.use_cpu_initialization else None)


def _layer_specs(config: Any, te: bool, num_experts: int | None) -> tuple[ModuleSpec, ModuleSpec]:
    """(full-attention layer, DeltaNet layer) specs with a dense MLP, or a MoE one when
    ``num_experts``."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    moe = dict(num_experts=num_experts, moe_grouped_gemm=False) if num_experts else {}
    if te:
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_submodules,
        )

        attention = get_gpt_layer_with_transformer_engine_submodules(qk_layernorm=True, **moe)
        deltanet = GatedDeltaNetSubmodules(in_proj=TELayerNormColumnParallelLinear,
                                           out_norm=_PlainTENorm,
                                           out_proj=TERowParallelLinear)
        input_norm, keys_map = IdentityOp, {}
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        attention = get_gpt_layer_local_submodules(qk_layernorm=True, normalization="RMSNorm",
                                                   **moe)
        norm = ZeroCenteredRMSNorm if config.layernorm_zero_centered_gamma else _LocalRMSNorm
        attention.input_layernorm = norm
        attention.pre_mlp_layernorm = norm
        attention.self_attention = copy.copy(attention.self_attention)
        attention.self_attention.submodules = dataclasses.replace(
            attention.self_attention.submodules, q_layernorm=norm, k_layernorm=norm)
        deltanet = GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear,
                                           out_norm=_LocalRMSNorm, out_proj=RowParallelLinear)
        input_norm = norm
        if num_experts:  # TE's MoE layers keep pre_mlp_layernorm separate (layers.py)
            from .layers import moe_layer_keys

            attention.sharded_state_dict_keys_map = moe_layer_keys(
                attention.sharded_state_dict_keys_map)
        keys_map = dict(attention.sharded_state_dict_keys_map,
                        **{"input_layernorm.": "self_attention.in_proj.layer_norm_"})
    deltanet_layer = TransformerLayerSubmodules(
        input_layernorm=input_norm,
        self_attention=ModuleSpec(module=GatedDeltaNet, submodules=deltanet),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=attention.pre_mlp_layernorm,
        mlp=attention.mlp,
        mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map=keys_map,
    )
    return (ModuleSpec(module=TransformerLayer, submodules=attention),
            ModuleSpec(module=TransformerLayer, submodules=deltanet_layer))


def hybrid_block_spec(config: Any, *, te: bool, vp_stage: int | None = None,
                      pp_rank: int | None = None):
    """``TransformerBlockSubmodules`` for this pipeline stage's layers: a ``GatedDeltaNet`` layer
    where ``config.linear_attention_freq`` says 1, gated full attention where it says 0, each
    with a MoE MLP where ``config.moe_layer_freq`` says 1 (else dense); zero-centred final
    norm when ``config.layernorm_zero_centered_gamma``."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    linear = list(config.linear_attention_freq)
    experts = config.num_moe_experts or None
    moe_pattern = config.moe_layer_freq if experts else 0
    if isinstance(moe_pattern, int):
        moe_pattern = [int(bool(experts) and i % moe_pattern == 0) for i in range(len(linear))]
    dense_specs = _layer_specs(config, te, None)
    moe_specs = _layer_specs(config, te, experts) if experts else dense_specs
    specs = [(moe_specs if m else dense_specs)[int(bool(la))]
             for la, m in zip(linear, moe_pattern)]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if te:
        from megatron.core.extensions.transformer_engine import TENorm

        final = TENorm
    else:
        final = ZeroCenteredRMSNorm if config.layernorm_zero_centered_gamma else _LocalRMSNorm
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + count], layer_norm=final)
