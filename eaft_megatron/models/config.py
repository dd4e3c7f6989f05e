"""HF config -> Megatron-Core ``TransformerConfig`` and ``GPTModel`` keyword arguments.

    from transformers import AutoConfig
    hf = AutoConfig.from_pretrained("/path/to/Qwen3-8B")  # a local directory
    check_parallel_sizes(hf, tp=2, pp=2)
    config = transformer_config_from_hf(hf, tensor_model_parallel_size=2,
                                        pipeline_model_parallel_size=2, bf16=True,
                                        params_dtype=torch.bfloat16)
    kwargs = gpt_model_kwargs(hf, tp=2)  # vocab_size (padded), rotary_percent, rotary_base, ...

Read from the loaded config object, never from the raw json: ``transformers`` fills defaults
that config.json may omit (GLM's ``partial_rotary_factor`` 0.5) and, from version 5 on, keeps
``rope_theta`` / ``partial_rotary_factor`` in ``config.rope_parameters``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .registry import get_arch
from .spec import ArchSpec, ModelDims

__all__ = [
    "ARCH_CONFIG_FIELDS",
    "check_config_matches",
    "check_parallel_sizes",
    "default_transformer_impl",
    "gpt_model_kwargs",
    "language_model_config",
    "linear_attention_config_from_hf",
    "moe_config_from_hf",
    "padded_vocab_size",
    "rope_from_hf",
    "te_available",
    "transformer_config_from_hf",
]

# TransformerConfig fields that transformer_config_from_hf derives from the HF config: callers
# may not override them, and check_config_matches compares them.
ARCH_CONFIG_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "layernorm_epsilon", "gated_linear_unit", "add_bias_linear",
    "add_qkv_bias", "qk_layernorm", "rotary_interleaved",
    # mixture of experts (None / False / defaults for dense models)
    "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_router_score_function",
    "moe_router_pre_softmax", "moe_layer_freq", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate", "moe_router_enable_expert_bias", "moe_router_num_groups",
    "moe_router_group_topk", "moe_router_topk_scaling_factor",
    # gated-DeltaNet hybrids (None / False / defaults otherwise)
    "experimental_attention_variant", "linear_attention_freq", "linear_conv_kernel_dim",
    "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
    "linear_num_value_heads", "attention_output_gate", "layernorm_zero_centered_gamma",
    # multi-latent attention (attributes of MLATransformerConfig only: None elsewhere)
    "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
    "qk_pos_emb_head_dim", "v_head_dim",
)


def language_model_config(hf_config: Any) -> Any:
    """The config the tables read: ``hf_config`` itself, or for a vision-language architecture
    whose spec names a ``text_config`` (Qwen3_5ForConditionalGeneration) a copy of that text
    config carrying the top-level ``architectures`` and ``tie_word_embeddings``. Raises
    ValueError when such a config has no text config."""
    from .registry import ARCHITECTURES

    archs = getattr(hf_config, "architectures", None) or [None]
    arch = ARCHITECTURES.get(archs[0])
    if arch is None or arch.text_config is None or getattr(hf_config, "_eaft_text_view", False):
        return hf_config
    text = getattr(hf_config, arch.text_config, None)
    if text is None:
        raise ValueError(f"{arch.hf_architecture}: the HF config has no {arch.text_config}")
    import copy

    view = copy.deepcopy(text)
    view.architectures = list(hf_config.architectures)
    view.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
    view._eaft_text_view = True
    return view


def te_available() -> bool:
    """Whether megatron-core found transformer-engine (its own ``HAVE_TE``)."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


def default_transformer_impl() -> str:
    """``"transformer_engine"`` when TE is importable, else ``"local"``.

    This is the default of :func:`transformer_config_from_hf`, of ``build_gpt_model`` and
    (through ``te=None``) of the name mappings, so the three agree unless told otherwise.
    """
    return "transformer_engine" if te_available() else "local"


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padding rule: the next multiple of ``divisible_by * tp`` (>= vocab_size).

    Note that the result depends on ``tp``: a checkpoint meant to load at several TP sizes
    should fix one padded size (e.g. from the largest TP) and pass it everywhere.
    """
    if vocab_size < 1 or tp < 1 or divisible_by < 1:
        raise ValueError(
            f"vocab_size={vocab_size}, tp={tp} and divisible_by={divisible_by} must be >= 1"
        )
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def check_parallel_sizes(hf_config: Any, tp: int, pp: int, ep: int = 1,
                         etp: int | None = None) -> None:
    """Raise ValueError unless TP divides the heads, query groups and FFN size, and PP divides
    the layers (uneven pipeline stages are not supported); for MoE models, EP must divide the
    routed experts and the expert TP (``etp``, default ``tp``) the expert FFN size."""
    d = ModelDims.from_hf(hf_config)
    etp = tp if etp is None else etp
    for what, n in (("linear_num_key_heads (gated DeltaNet)", d.linear_key_heads),
                    ("linear_num_value_heads (gated DeltaNet)", d.linear_value_heads)):
        if n and n % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide {what}={n}")
    if tp < 1 or pp < 1 or ep < 1 or etp < 1:
        raise ValueError(f"parallel sizes must be >= 1; got tp={tp}, pp={pp}, ep={ep}, "
                         f"etp={etp}")
    if not d.num_experts and (ep > 1 or etp != tp):
        raise ValueError(f"expert parallelism (ep={ep}, etp={etp}) needs a mixture-of-experts "
                         "model")
    if d.num_experts:
        if d.num_experts % ep:
            raise ValueError(f"expert parallel size {ep} does not divide the "
                             f"{d.num_experts} routed experts")
        if d.moe_ffn_hidden_size % etp:
            raise ValueError(f"expert tensor parallel size {etp} does not divide "
                             f"moe_intermediate_size={d.moe_ffn_hidden_size}")
        if d.shared_expert_size % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the shared expert "
                             f"size {d.shared_expert_size}")
    # multi-latent attention: megatron's local spec splits the down projections' outputs too
    for what, n in (("q_lora_rank", d.q_lora_rank),
                    ("kv_lora_rank + qk_rope_head_dim", d.kv_lora_rank + d.qk_rope_head_dim)):
        if d.kv_lora_rank and n % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide {what}={n}")
    for what, n in (("num_attention_heads", d.num_attention_heads),
                    ("num_key_value_heads (query groups)", d.num_query_groups),
                    ("intermediate_size", d.ffn_hidden_size)):
        if n % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide {what}={n}")
    if d.num_layers % pp:
        raise ValueError(
            f"pipeline parallel size {pp} does not divide num_hidden_layers={d.num_layers} "
            "(uneven pipeline stages are not supported)"
        )


def rope_from_hf(hf_config: Any, arch: ArchSpec | None = None) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) of a HF config, transformers 4.x or 5.x.

    Only plain RoPE is supported: a scaled variant (yarn, linear, dynamic, llama3) raises.
    """
    arch = arch or get_arch(hf_config)
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})  # transformers 4.x
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ValueError(
            f"{arch.hf_architecture}: rope type {rope_type!r} is not supported (only 'default')"
        )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError(f"{arch.hf_architecture}: the HF config has no rope_theta")
    factor = params.get("partial_rotary_factor",
                        getattr(hf_config, "partial_rotary_factor", None))
    if factor is None:
        factor = arch.partial_rotary_factor
    if not 0 < factor <= 1:
        raise ValueError(f"partial_rotary_factor={factor} is not in (0, 1]")
    return float(theta), float(factor)


def _check_supported(hf_config: Any, arch: ArchSpec) -> None:
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{arch.hf_architecture}: hidden_act={act!r} is not supported ('silu')")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError(f"{arch.hf_architecture}: use_sliding_window=True is not supported")
    for attr, why in arch.unsupported:
        if getattr(hf_config, attr, False):
            raise ValueError(
                f"{arch.hf_architecture}: {attr}={getattr(hf_config, attr)!r} is not supported: "
                f"{why}"
            )
    if arch.mla and not getattr(hf_config, "q_lora_rank", None):
        raise ValueError(
            f"{arch.hf_architecture}: q_lora_rank=None (one q_proj, no query latent) is not "
            "supported: megatron-core 0.19's multi-latent attention then builds linear_q_proj "
            "as a fused norm+linear (TransformerEngine only; the local spec fails with "
            "'qk_layernorm requires TransformerEngine or q_layernorm/kv_layernorm to be set in "
            "the spec to build `linear_q_proj`'), a query norm transformers does not have")
    if arch.mla and not getattr(hf_config, "rope_interleave", True):
        raise ValueError(f"{arch.hf_architecture}: rope_interleave=False is not supported "
                         "(megatron-core's multi-latent attention always rotates interleaved "
                         "pairs)")
    if arch.moe is not None:
        moe_config_from_hf(hf_config, arch)  # raises on router settings megatron lacks


def moe_config_from_hf(hf_config: Any, arch: ArchSpec | None = None) -> dict[str, Any]:
    """The megatron-core ``TransformerConfig`` MoE fields of a HF MoE config ({} if dense).

    Architecture fields (in ``ARCH_CONFIG_FIELDS``) plus the training defaults that follow the
    HF model: ``moe_aux_loss_coeff`` <- ``router_aux_loss_coef`` (load balancing
    ``aux_loss``, or none when 0), the all-to-all token dispatcher, ``moe_grouped_gemm=False``
    (per-expert ``SequentialMLP`` weights: the same names with and without TransformerEngine).
    Raises ValueError for router settings that megatron-core cannot reproduce.
    """
    arch = arch or get_arch(hf_config)
    moe = arch.moe
    if moe is None:
        return {}
    d = ModelDims.from_hf(hf_config)
    name = arch.hf_architecture
    topk = int(hf_config.num_experts_per_tok)
    norm_topk = moe.norm_topk_prob if moe.norm_topk_prob is not None else \
        bool(getattr(hf_config, "norm_topk_prob", False))
    if not d.num_experts or not 0 < topk <= d.num_experts:
        raise ValueError(f"{name}: num_experts_per_tok={topk} with {d.num_experts} experts")
    pattern = list(arch.moe_layers(hf_config))
    if not any(pattern):
        raise ValueError(f"{name}: no layer is a mixture-of-experts layer (moe_layer_freq "
                         f"{pattern}); convert it as the dense architecture")
    coeff = float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0)
    out: dict[str, Any] = dict(
        num_moe_experts=d.num_experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=d.moe_ffn_hidden_size,
        moe_router_score_function=moe.score_function,
        moe_layer_freq=pattern,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=coeff,
        moe_router_load_balancing_type="aux_loss" if coeff > 0 else "none",
    )
    if moe.score_function == "softmax":
        # norm_topk_prob: softmax over the k selected logits == the renormalised k
        # probabilities; otherwise the probabilities of the softmax over all experts.
        if norm_topk and topk == 1:
            raise ValueError(f"{name}: norm_topk_prob with num_experts_per_tok=1 (weight 1) has "
                             "no megatron-core router equivalent")
        out["moe_router_pre_softmax"] = not norm_topk
    elif not norm_topk and topk > 1:
        raise ValueError(f"{name}: norm_topk_prob=False is not supported with the sigmoid "
                         "router (megatron-core always renormalises the top-k scores)")
    if d.shared_expert_size:
        out["moe_shared_expert_intermediate_size"] = d.shared_expert_size
        out["moe_shared_expert_gate"] = moe.shared_expert_gate
    if moe.expert_bias:
        out["moe_router_enable_expert_bias"] = True
    if moe.grouped_topk:
        groups = int(getattr(hf_config, "n_group", 1) or 1)
        group_topk = int(getattr(hf_config, "topk_group", 1) or 1)
        if groups > 1:
            # megatron ranks groups by the sum of their top (topk / group_topk) scores, HF by
            # the sum of their top 2: the same only when topk / group_topk == 2.
            if topk // group_topk != 2:
                raise ValueError(f"{name}: n_group={groups}, topk_group={group_topk} with "
                                 f"num_experts_per_tok={topk}: megatron-core scores groups by "
                                 f"their top {topk // group_topk} experts, transformers by 2")
            out.update(moe_router_num_groups=groups, moe_router_group_topk=group_topk)
    if moe.scaling_factor:
        factor = getattr(hf_config, moe.scaling_factor, None)
        if factor is not None and float(factor) != 1.0:
            out["moe_router_topk_scaling_factor"] = float(factor)
    if moe.router_fp32:
        out["moe_router_dtype"] = "fp32"
    return out


def linear_attention_config_from_hf(hf_config: Any, arch: ArchSpec | None = None
                                    ) -> dict[str, Any]:
    """The megatron-core ``TransformerConfig`` fields of a gated-DeltaNet hybrid ({} for other
    architectures): ``experimental_attention_variant="gated_delta_net"``, the per-layer
    ``linear_attention_freq`` list from ``layer_types`` (1 = DeltaNet), the DeltaNet sizes, the
    attention output gate and zero-centred norms. Raises ValueError for a ``layer_types`` list
    megatron-core cannot express and for value heads that are not a multiple of key heads."""
    arch = arch or get_arch(hf_config)
    out: dict[str, Any] = {}
    if arch.attention_output_gate:
        out["attention_output_gate"] = True
    if arch.zero_centered_norms:
        out["layernorm_zero_centered_gamma"] = True
    if not arch.linear_attention:
        return out
    d = ModelDims.from_hf(hf_config)
    if d.linear_value_heads % d.linear_key_heads:
        raise ValueError(f"{arch.hf_architecture}: linear_num_value_heads="
                         f"{d.linear_value_heads} is not a multiple of linear_num_key_heads="
                         f"{d.linear_key_heads}")
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{arch.hf_architecture}: hidden_act={act!r} is not supported ('silu')")
    out.update(
        experimental_attention_variant="gated_delta_net",
        linear_attention_freq=arch.linear_layers(hf_config),
        linear_conv_kernel_dim=d.linear_conv_kernel,
        linear_key_head_dim=d.linear_key_head_dim,
        linear_value_head_dim=d.linear_value_head_dim,
        linear_num_key_heads=d.linear_key_heads,
        linear_num_value_heads=d.linear_value_heads,
    )
    return out


def transformer_config_from_hf(hf_config: Any, **overrides: Any):
    """A Megatron-Core ``TransformerConfig`` for a HF Qwen2/Qwen3/GLM-4/GLM-4-0414 config.

    ``overrides`` set everything that is not architecture (``ARCH_CONFIG_FIELDS`` raise):
    ``tensor_model_parallel_size``, ``pipeline_model_parallel_size``, ``sequence_parallel``,
    ``params_dtype``, ``bf16``, ``use_cpu_initialization``, ``perform_initialization``, the
    fusion flags, dropouts, ``transformer_impl`` (default :func:`default_transformer_impl`).
    With PP > 1, ``pipeline_dtype`` defaults to ``params_dtype``. Dropouts default to the HF
    values (0.0), not Megatron's 0.1.
    """
    from megatron.core.transformer import TransformerConfig

    arch = get_arch(hf_config)
    _check_supported(hf_config, arch)
    rope_from_hf(hf_config, arch)  # reject unsupported rotary early
    clash = sorted(set(overrides) & set(ARCH_CONFIG_FIELDS))
    if clash:
        raise ValueError(f"{clash} are read from the HF config and cannot be overridden")
    d = ModelDims.from_hf(hf_config)
    tp = overrides.get("tensor_model_parallel_size", 1)
    pp = overrides.get("pipeline_model_parallel_size", 1)
    ep = overrides.get("expert_model_parallel_size", 1)
    etp = overrides.get("expert_tensor_parallel_size")
    check_parallel_sizes(hf_config, tp, pp, ep, etp)

    kwargs: dict[str, Any] = dict(
        num_layers=d.num_layers,
        hidden_size=d.hidden_size,
        ffn_hidden_size=d.ffn_hidden_size,
        num_attention_heads=d.num_attention_heads,
        num_query_groups=d.num_query_groups,
        kv_channels=d.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.flags(hf_config)["qkv_bias"],
        qk_layernorm=arch.flags(hf_config)["qk_layernorm"],
        rotary_interleaved=arch.rotary_interleaved,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        transformer_impl=default_transformer_impl(),
    )
    kwargs.update(moe_config_from_hf(hf_config, arch))
    kwargs.update(linear_attention_config_from_hf(hf_config, arch))
    config_class = TransformerConfig
    if arch.mla:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        config_class = MLATransformerConfig
        kwargs.update(_mla_config(hf_config, arch, d))
    kwargs.update(overrides)
    if pp > 1 and "pipeline_dtype" not in overrides:
        kwargs["pipeline_dtype"] = kwargs.get("params_dtype", torch.float32)
    return config_class(**kwargs)


def _mla_config(hf_config: Any, arch: ArchSpec, d: ModelDims) -> dict[str, Any]:
    """``MLATransformerConfig`` fields of a multi-latent attention config.

    The latent norms (``q_a_layernorm``, ``kv_a_layernorm``) are megatron's q/kv layernorms
    (``qk_layernorm``); ``kv_channels`` is the value head size (what megatron's local core
    attention reshapes its output by). Plain rotary over ``qk_rope_head_dim`` with the HF
    ``rope_theta``; megatron's softmax scale is then ``1 / sqrt(qk_nope + qk_rope)`` as HF's.
    """
    theta, _ = rope_from_hf(hf_config, arch)
    return dict(multi_latent_attention=True, q_lora_rank=d.q_lora_rank or None,
                kv_lora_rank=d.kv_lora_rank, qk_head_dim=d.qk_nope_head_dim,
                qk_pos_emb_head_dim=d.qk_rope_head_dim, v_head_dim=d.v_head_dim,
                kv_channels=d.v_head_dim, qk_layernorm=True, rope_type="rope",
                rotary_base=theta, rotary_percent=1.0, rotary_scaling_factor=1.0)


def check_config_matches(hf_config: Any, config: Any) -> None:
    """Raise ValueError if a ``TransformerConfig`` made elsewhere (e.g. by Megatron-LM from its
    arguments) disagrees with the HF config on any architecture field."""
    expected = transformer_config_from_hf(hf_config, transformer_impl="local")
    wrong = [
        f"{f}={getattr(config, f, None)!r} (HF config: {getattr(expected, f, None)!r})"
        for f in ARCH_CONFIG_FIELDS
        if getattr(config, f, None) != getattr(expected, f, None)
    ]
    if getattr(config, "activation_func", None) is not F.silu:
        wrong.append(f"activation_func={getattr(config, 'activation_func', None)!r} (HF: silu)")
    check_parallel_sizes(hf_config, config.tensor_model_parallel_size,
                         config.pipeline_model_parallel_size,
                         getattr(config, "expert_model_parallel_size", 1) or 1,
                         getattr(config, "expert_tensor_parallel_size", None))
    if wrong:
        raise ValueError(
            f"{get_arch(hf_config).hf_architecture}: TransformerConfig does not match the HF "
            f"config: {'; '.join(wrong)}"
        )


def gpt_model_kwargs(hf_config: Any, *, padded_vocab: int | None = None, tp: int = 1
                     ) -> dict[str, Any]:
    """``GPTModel`` keyword arguments besides config / spec / pre- and post-process.

    ``padded_vocab`` defaults to :func:`padded_vocab_size` (vocab, tp); pass the checkpoint's
    padded size when loading one made at another TP.
    """
    arch = get_arch(hf_config)
    theta, factor = rope_from_hf(hf_config, arch)
    vocab = hf_config.vocab_size
    if padded_vocab is None:
        padded_vocab = padded_vocab_size(vocab, tp)
    if padded_vocab < vocab or padded_vocab % tp:
        raise ValueError(
            f"padded_vocab={padded_vocab} must be >= vocab_size={vocab} and divisible by tp={tp}"
        )
    return dict(
        vocab_size=padded_vocab,
        max_sequence_length=hf_config.max_position_embeddings,
        position_embedding_type="rope",
        rotary_percent=factor,
        rotary_base=int(theta) if theta.is_integer() else theta,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )
