"""The vocabulary that the per-architecture tables (``qwen2.py``, ``glm4.py``, ...) are written in.

An :class:`ArchSpec` is a few flags plus a table of mappings, each one Megatron parameter <- one
or more HF tensors, with ``{}`` standing for the layer index on both sides::

    Rename(M + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight")
    FusedQKV(M + "self_attention.linear_qkv.bias", q=H + "self_attn.q_proj.bias", ...,
             when="qkv_bias")

Megatron names are those of ``GPTModel.state_dict()`` built with the *local* layer spec at
TP=1/PP=1; the TransformerEngine names differ only where TE fuses a norm into the next linear
(see ``mapping.TE_RENAMES``). Mapping kinds know how to turn their HF tensors into the Megatron
tensor and back (through the pure helpers in ``transforms.py``) and which shapes to expect.

Mixture-of-Experts (``qwen3_moe.py``, ``qwen2_moe.py``, ``glm4_moe.py``): an :class:`MoESpec`
in ``ArchSpec.moe`` says how the HF config names the router settings (``config.py`` turns them
into megatron-core's ``num_moe_experts`` / ``moe_router_*`` / ``moe_layer_freq`` fields and
``layers.py`` into megatron's own MoE layer spec). Per-expert rows carry a second ``{}`` (the
expert index) on both sides and are repeated for every expert; rows with ``when="dense"`` /
``when="moe"`` apply only to the dense / MoE layers of ``MoESpec.layer_pattern``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from .transforms import cut_vocab, merge_gated, merge_qkv, pad_vocab, split_gated, split_qkv

__all__ = [
    "ArchSpec",
    "FusedQKV",
    "GatedMLP",
    "LAYER_CONDITIONS",
    "MEGATRON_SHAPES",
    "MoESpec",
    "Mapping",
    "ModelDims",
    "Rename",
    "VocabRows",
]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModelDims:
    """The sizes every mapping needs, read from a HF config (see :meth:`from_hf`)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    """Per-head size; Qwen3 and GLM set it explicitly (not hidden_size / heads)."""
    vocab_size: int
    """The HF (real) vocabulary; Megatron's is padded to a multiple of 128 x tp."""
    num_experts: int = 0
    """Routed experts per MoE layer (0: a dense model)."""
    moe_ffn_hidden_size: int = 0
    """Intermediate size of one routed expert."""
    shared_expert_size: int = 0
    """Intermediate size of the (fused) shared expert; 0 when there is none."""

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelDims:
        heads = hf_config.num_attention_heads
        experts = getattr(hf_config, "num_experts", None) or \
            getattr(hf_config, "n_routed_experts", None) or 0
        moe_ffn = getattr(hf_config, "moe_intermediate_size", None) or 0
        shared = getattr(hf_config, "shared_expert_intermediate_size", None) or \
            moe_ffn * (getattr(hf_config, "n_shared_experts", None) or 0)
        return cls(
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            ffn_hidden_size=hf_config.intermediate_size,
            num_attention_heads=heads,
            num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            vocab_size=hf_config.vocab_size,
            num_experts=int(experts),
            moe_ffn_hidden_size=int(moe_ffn),
            shared_expert_size=int(shared),
        )

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim


# Megatron parameter shapes (local spec names, TP=1) as functions of (dims, padded vocab).
MEGATRON_SHAPES: dict[str, Callable[[ModelDims, int], Shape]] = {
    "embedding.word_embeddings.weight": lambda d, v: (v, d.hidden_size),
    "output_layer.weight": lambda d, v: (v, d.hidden_size),
    "decoder.final_layernorm.weight": lambda d, v: (d.hidden_size,),
    "decoder.layers.{}.input_layernorm.weight": lambda d, v: (d.hidden_size,),
    "decoder.layers.{}.self_attention.linear_qkv.weight": lambda d, v: (
        d.qkv_rows, d.hidden_size),
    "decoder.layers.{}.self_attention.linear_qkv.bias": lambda d, v: (d.qkv_rows,),
    "decoder.layers.{}.self_attention.q_layernorm.weight": lambda d, v: (d.head_dim,),
    "decoder.layers.{}.self_attention.k_layernorm.weight": lambda d, v: (d.head_dim,),
    "decoder.layers.{}.self_attention.linear_proj.weight": lambda d, v: (
        d.hidden_size, d.num_attention_heads * d.head_dim),
    "decoder.layers.{}.post_self_attn_layernorm.weight": lambda d, v: (d.hidden_size,),
    "decoder.layers.{}.pre_mlp_layernorm.weight": lambda d, v: (d.hidden_size,),
    "decoder.layers.{}.mlp.linear_fc1.weight": lambda d, v: (
        2 * d.ffn_hidden_size, d.hidden_size),
    "decoder.layers.{}.mlp.linear_fc2.weight": lambda d, v: (d.hidden_size, d.ffn_hidden_size),
    "decoder.layers.{}.post_mlp_layernorm.weight": lambda d, v: (d.hidden_size,),
    # Mixture of experts (megatron's MoELayer with SequentialMLP experts; {} {} = layer, expert)
    "decoder.layers.{}.mlp.router.weight": lambda d, v: (d.num_experts, d.hidden_size),
    "decoder.layers.{}.mlp.router.expert_bias": lambda d, v: (d.num_experts,),
    "decoder.layers.{}.mlp.experts.local_experts.{}.linear_fc1.weight": lambda d, v: (
        2 * d.moe_ffn_hidden_size, d.hidden_size),
    "decoder.layers.{}.mlp.experts.local_experts.{}.linear_fc2.weight": lambda d, v: (
        d.hidden_size, d.moe_ffn_hidden_size),
    "decoder.layers.{}.mlp.shared_experts.linear_fc1.weight": lambda d, v: (
        2 * d.shared_expert_size, d.hidden_size),
    "decoder.layers.{}.mlp.shared_experts.linear_fc2.weight": lambda d, v: (
        d.hidden_size, d.shared_expert_size),
    "decoder.layers.{}.mlp.shared_experts.gate_weight": lambda d, v: (1, d.hidden_size),
}

# ``when`` conditions decided per layer (the others are per model, see ArchSpec.flags).
LAYER_CONDITIONS = ("dense", "moe")


@dataclass(frozen=True)
class Mapping:
    """One Megatron parameter <- HF tensors. ``when`` names an :meth:`ArchSpec.flags` entry
    that must be true for the mapping to apply (e.g. ``"untied"``, ``"qkv_bias"``)."""

    megatron: str
    when: str | None = field(default=None, kw_only=True)

    hf_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        if not self.megatron or not all(self.hf):
            raise ValueError(f"{type(self).__name__} needs every name; got {self!r}")
        if any(h.count("{}") != self.megatron.count("{}") for h in self.hf):
            raise ValueError(f"{self!r}: Megatron and HF names must have the same placeholders")

    @property
    def hf(self) -> tuple[str, ...]:
        """The HF name templates, in the order ``to_megatron`` takes them."""
        return tuple(getattr(self, f) for f in self.hf_fields)

    @property
    def per_layer(self) -> bool:
        return "{}" in self.megatron

    @property
    def per_expert(self) -> bool:
        """Whether the row is repeated for every routed expert (a second ``{}``)."""
        return self.megatron.count("{}") == 2

    def hf_shapes(self, megatron_shape: Shape, dims: ModelDims) -> tuple[Shape, ...]:
        """Expected shape of each HF tensor, given the Megatron tensor's."""
        raise NotImplementedError

    def to_megatron(self, hf: tuple[torch.Tensor, ...], dims: ModelDims,
                    padded_vocab: int) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, t: torch.Tensor, dims: ModelDims) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


@dataclass(frozen=True)
class Rename(Mapping):
    """Same tensor, another name (norms, linear_proj, linear_fc2, GLM's gate_up_proj)."""

    hf_name: str = ""
    hf_fields: ClassVar[tuple[str, ...]] = ("hf_name",)

    def hf_shapes(self, megatron_shape, dims):
        return (megatron_shape,)

    def to_megatron(self, hf, dims, padded_vocab):
        return hf[0]

    def to_hf(self, t, dims):
        return (t,)


@dataclass(frozen=True)
class VocabRows(Rename):
    """An embedding or output weight: vocabulary rows padded on import, cut on export."""

    def hf_shapes(self, megatron_shape, dims):
        return ((dims.vocab_size, *megatron_shape[1:]),)

    def to_megatron(self, hf, dims, padded_vocab):
        return pad_vocab(hf[0], padded_vocab)

    def to_hf(self, t, dims):
        return (cut_vocab(t, dims.vocab_size),)


@dataclass(frozen=True)
class FusedQKV(Mapping):
    """``linear_qkv`` (weight or bias) <- q_proj, k_proj, v_proj, fused per query group."""

    q: str = ""
    k: str = ""
    v: str = ""
    hf_fields: ClassVar[tuple[str, ...]] = ("q", "k", "v")

    def hf_shapes(self, megatron_shape, dims):
        rest = megatron_shape[1:]
        kv = (dims.num_query_groups * dims.head_dim, *rest)
        return ((dims.num_attention_heads * dims.head_dim, *rest), kv, kv)

    def to_megatron(self, hf, dims, padded_vocab):
        return merge_qkv(*hf, num_query_groups=dims.num_query_groups, head_dim=dims.head_dim)

    def to_hf(self, t, dims):
        return split_qkv(t, num_query_groups=dims.num_query_groups,
                         num_heads=dims.num_attention_heads, head_dim=dims.head_dim)


@dataclass(frozen=True)
class GatedMLP(Mapping):
    """``linear_fc1`` <- separate gate_proj and up_proj, stacked as ``[gate; up]``."""

    gate: str = ""
    up: str = ""
    hf_fields: ClassVar[tuple[str, ...]] = ("gate", "up")

    def hf_shapes(self, megatron_shape, dims):
        half = (megatron_shape[0] // 2, *megatron_shape[1:])
        return (half, half)

    def to_megatron(self, hf, dims, padded_vocab):
        return merge_gated(*hf)

    def to_hf(self, t, dims):
        return split_gated(t)


def _qwen_moe_layers(hf_config: Any) -> list[int]:
    """Qwen2-MoE / Qwen3-MoE: layer i is sparse unless listed in ``mlp_only_layers``, and
    only every ``decoder_sparse_step``-th layer is (as transformers' decoder layer decides)."""
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
    return [int(i not in dense and (i + 1) % step == 0)
            for i in range(hf_config.num_hidden_layers)]


def _first_k_dense_layers(hf_config: Any) -> list[int]:
    """GLM-4.5: the first ``first_k_dense_replace`` layers are dense, the rest MoE."""
    k = getattr(hf_config, "first_k_dense_replace", 0) or 0
    return [int(i >= k) for i in range(hf_config.num_hidden_layers)]


@dataclass(frozen=True)
class MoESpec:
    """How a HF MoE config names its router settings (megatron-core field <- HF attribute)."""

    score_function: str = "softmax"
    """``softmax`` (Qwen: over all experts, then top-k) or ``sigmoid`` (GLM-4.5)."""
    layer_pattern: Callable[[Any], list[int]] = _qwen_moe_layers
    """HF config -> megatron ``moe_layer_freq`` list (1 = MoE layer, 0 = dense)."""
    shared_expert_gate: bool = False
    """Qwen2-MoE's sigmoid gate on the shared expert (``shared_expert_gate.weight`` [1, h])."""
    expert_bias: bool = False
    """Aux-loss-free routing bias (GLM-4.5's ``e_score_correction_bias``) ->
    ``moe_router_enable_expert_bias``."""
    grouped_topk: bool = False
    """``n_group`` / ``topk_group`` -> ``moe_router_num_groups`` / ``moe_router_group_topk``."""
    scaling_factor: str | None = None
    """HF attribute of the routed-output scale (GLM: ``routed_scaling_factor``)."""
    router_fp32: bool = False
    """The HF router computes its logits in fp32 whatever the model dtype (GLM-4.5)."""


@dataclass(frozen=True)
class ArchSpec:
    """One HF architecture: the flags that shape the Megatron model, and its mapping table."""

    hf_architecture: str
    """``config.architectures[0]``, the registry key."""
    mappings: tuple[Mapping, ...]
    """Table order is conversion order: whole-model rows before the first per-layer row come
    first, then every layer's rows layer by layer, then the remaining whole-model rows."""
    qkv_bias: bool | str = False
    """Whether q/k/v carry a bias: a constant, or the HF config attribute that decides."""
    qk_layernorm: bool | str = False
    """Per-head RMSNorm on queries and keys before rotary (Qwen3's q_norm / k_norm): a
    constant, or the HF config attribute that decides (GLM-4.5's ``use_qk_norm``)."""
    sandwich_norms: bool = False
    """Extra RMSNorms on the attention and MLP outputs before the residual adds (GLM-4-0414)."""
    rotary_interleaved: bool = False
    """GPT-J style rotary over pairs (2i, 2i+1) instead of the half-split (i, i + d/2)."""
    partial_rotary_factor: float = 1.0
    """Fraction of each head that is rotated, when the HF config does not say (GLM: 0.5)."""
    unsupported: tuple[tuple[str, str], ...] = ()
    """(HF config attribute, reason): a truthy value is rejected with the reason."""
    moe: MoESpec | None = None
    """Mixture-of-experts settings; None for dense architectures."""
    extra_hf_layers: str | None = None
    """HF config attribute counting decoder layers stored after ``num_hidden_layers`` that the
    Megatron model does not hold (GLM-4.5's ``num_nextn_predict_layers`` MTP layers): the
    converter carries them through in a side file (``convert.py``)."""

    def __post_init__(self):
        for m in self.mappings:
            if m.megatron not in MEGATRON_SHAPES:
                raise ValueError(
                    f"{self.hf_architecture}: no shape rule for Megatron name {m.megatron!r}; "
                    "add it to spec.MEGATRON_SHAPES"
                )
            if m.when not in (None, "qkv_bias", "qk_layernorm", "untied", *LAYER_CONDITIONS):
                raise ValueError(f"{self.hf_architecture}: unknown mapping condition {m.when!r}")

    def flags(self, hf_config: Any) -> dict[str, bool]:
        """Values of the ``when`` conditions for this HF config."""
        qkv_bias = self.qkv_bias
        if isinstance(qkv_bias, str):
            qkv_bias = bool(getattr(hf_config, qkv_bias, False))
        qk_norm = self.qk_layernorm
        if isinstance(qk_norm, str):
            qk_norm = bool(getattr(hf_config, qk_norm, False))
        return dict(qkv_bias=bool(qkv_bias), qk_layernorm=bool(qk_norm),
                    untied=not getattr(hf_config, "tie_word_embeddings", False))

    def moe_layers(self, hf_config: Any) -> list[int]:
        """Per layer: 1 for a MoE layer, 0 for a dense one (all 0 without ``moe``)."""
        if self.moe is None:
            return [0] * hf_config.num_hidden_layers
        return self.moe.layer_pattern(hf_config)

    def active_mappings(self, hf_config: Any) -> list[Mapping]:
        """The rows that apply to this config; per-layer conditions (``dense`` / ``moe``)
        are kept here and decided layer by layer (``mapping._steps``)."""
        flags = self.flags(hf_config)
        return [m for m in self.mappings
                if m.when is None or m.when in LAYER_CONDITIONS or flags[m.when]]
