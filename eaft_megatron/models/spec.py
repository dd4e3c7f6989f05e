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

Gated-DeltaNet hybrids (``qwen3_5.py``): ``ArchSpec.linear_attention`` says that the HF
``layer_types`` list picks, per layer, megatron-core's ``GatedDeltaNet`` (``"linear_attention"``)
or gated full attention (``"full_attention"``); rows with ``when="linear"`` / ``when="attention"``
apply only to layers of that kind. The DeltaNet tensors map through :class:`DeltaNetInProj`
(q, k, v, z, b, a stacked into megatron's ``in_proj``) and renames (``conv1d``, ``A_log``,
``dt_bias``, the gated output norm ``out_norm``, ``out_proj``); the gated attention's query
projection through :class:`FusedQKVGate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from .transforms import (
    cut_vocab,
    merge_gated,
    merge_qkv,
    group_qkvz_ba,
    merge_qkv_gate,
    pad_vocab,
    split_gated,
    split_qkv,
    split_qkv_gate,
    ungroup_qkvz_ba,
)

__all__ = [
    "ArchSpec",
    "DeltaNetInProj",
    "DeltaNetGroupedInProj",
    "FusedQKV",
    "FusedQKVGate",
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
    # Multi-latent attention (GLM-4.7-Flash); all 0 for other attention.
    q_lora_rank: int = 0
    """Rank of the query down-projection (0: one ``q_proj``, no low-rank query)."""
    kv_lora_rank: int = 0
    """Rank of the compressed key/value latent (0: not multi-latent attention)."""
    qk_nope_head_dim: int = 0
    """Per-head query/key size without rotary (megatron ``qk_head_dim``)."""
    qk_rope_head_dim: int = 0
    """Per-head rotary query/key size; one rotary key is shared by all heads
    (megatron ``qk_pos_emb_head_dim``)."""
    v_head_dim: int = 0
    """Per-head value size."""
    output_gate: bool = False
    """Gated attention (``ArchSpec.attention_output_gate``): q_proj holds a sigmoid gate per
    query head, which megatron's ``linear_qkv`` stores after each group's queries."""
    linear_key_heads: int = 0
    """Gated DeltaNet: query/key heads (``linear_num_key_heads``; 0: no DeltaNet layers)."""
    linear_value_heads: int = 0
    """Gated DeltaNet: value heads (``linear_num_value_heads``), a multiple of the key heads."""
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    """Width of the DeltaNet's causal depthwise convolution over q, k, v."""

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelDims:
        heads = hf_config.num_attention_heads
        experts = getattr(hf_config, "num_experts", None) or \
            getattr(hf_config, "n_routed_experts", None) or 0
        moe_ffn = getattr(hf_config, "moe_intermediate_size", None) or 0
        shared = getattr(hf_config, "shared_expert_intermediate_size", None) or \
            moe_ffn * (getattr(hf_config, "n_shared_experts", None) or 0)
        from .registry import ARCHITECTURES  # the registry imports this module

        archs = getattr(hf_config, "architectures", None) or [None]
        arch = ARCHITECTURES.get(archs[0])
        linear = bool(arch is not None and arch.linear_attention)
        return cls(
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            # Qwen3.5-MoE's config has no intermediate_size (every layer is MoE): megatron's
            # dense-FFN size is then unused, and the expert size stands in for it.
            ffn_hidden_size=getattr(hf_config, "intermediate_size", None) or moe_ffn,
            num_attention_heads=heads,
            num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            vocab_size=hf_config.vocab_size,
            num_experts=int(experts),
            moe_ffn_hidden_size=int(moe_ffn),
            shared_expert_size=int(shared),
            **_mla_dims(hf_config),
            output_gate=bool(arch is not None and arch.attention_output_gate),
            linear_key_heads=int(hf_config.linear_num_key_heads) if linear else 0,
            linear_value_heads=int(hf_config.linear_num_value_heads) if linear else 0,
            linear_key_head_dim=int(hf_config.linear_key_head_dim) if linear else 0,
            linear_value_head_dim=int(hf_config.linear_value_head_dim) if linear else 0,
            linear_conv_kernel=int(hf_config.linear_conv_kernel_dim) if linear else 0,
        )

    @property
    def attention_out(self) -> int:
        """Input size of ``linear_proj``: heads x value head size."""
        return self.num_attention_heads * (self.v_head_dim or self.head_dim)

    @property
    def q_head_rows(self) -> int:
        """Multi-latent attention: query rows, per head ``[nope; rope]``."""
        return self.num_attention_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)

    @property
    def qkv_rows(self) -> int:
        """Rows of megatron's ``linear_qkv``: queries (and their gates), keys, values."""
        q_heads = self.num_attention_heads * (2 if self.output_gate else 1)
        return (q_heads + 2 * self.num_query_groups) * self.head_dim

    @property
    def linear_qk_dim(self) -> int:
        """DeltaNet: the width of all query (or all key) heads."""
        return self.linear_key_heads * self.linear_key_head_dim

    @property
    def linear_v_dim(self) -> int:
        """DeltaNet: the width of all value (or all output-gate ``z``) heads."""
        return self.linear_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        """DeltaNet: the channels of its convolution, q, k and v stacked."""
        return 2 * self.linear_qk_dim + self.linear_v_dim

    @property
    def linear_in_proj_rows(self) -> int:
        """DeltaNet: rows of megatron's ``in_proj``: q, k, v, z, then b and a (one per value
        head each)."""
        return self.linear_conv_dim + self.linear_v_dim + 2 * self.linear_value_heads


def _mla_dims(hf_config: Any) -> dict[str, int]:
    """The multi-latent attention sizes of a HF config ({} without ``kv_lora_rank``)."""
    if not getattr(hf_config, "kv_lora_rank", None):
        return {}
    return dict(q_lora_rank=int(getattr(hf_config, "q_lora_rank", None) or 0),
                kv_lora_rank=int(hf_config.kv_lora_rank),
                qk_nope_head_dim=int(hf_config.qk_nope_head_dim),
                qk_rope_head_dim=int(hf_config.qk_rope_head_dim),
                v_head_dim=int(hf_config.v_head_dim))


# Megatron parameter shapes (local spec names, TP=1) as functions of (dims, padded vocab).
MEGATRON_SHAPES: dict[str, Callable[[ModelDims, int], Shape]] = {
    "embedding.word_embeddings.weight": lambda d, v: (v, d.hidden_size),
    "output_layer.weight": lambda d, v: (v, d.hidden_size),
    "decoder.final_layernorm.weight": lambda d, v: (d.hidden_size,),
    "decoder.layers.{}.input_layernorm.weight": lambda d, v: (d.hidden_size,),
    "decoder.layers.{}.self_attention.linear_qkv.weight": lambda d, v: (
        d.qkv_rows, d.hidden_size),
    "decoder.layers.{}.self_attention.linear_qkv.bias": lambda d, v: (d.qkv_rows,),
    # q_layernorm: per head (Qwen3's q_norm), or over the query latent of multi-latent
    # attention (q_a_layernorm)
    "decoder.layers.{}.self_attention.q_layernorm.weight": lambda d, v: (
        d.q_lora_rank or d.head_dim,),
    "decoder.layers.{}.self_attention.k_layernorm.weight": lambda d, v: (d.head_dim,),
    "decoder.layers.{}.self_attention.linear_proj.weight": lambda d, v: (
        d.hidden_size, d.attention_out),
    # Multi-latent attention (megatron's MLASelfAttention)
    "decoder.layers.{}.self_attention.linear_q_proj.weight": lambda d, v: (
        d.q_head_rows, d.hidden_size),
    "decoder.layers.{}.self_attention.linear_q_down_proj.weight": lambda d, v: (
        d.q_lora_rank, d.hidden_size),
    "decoder.layers.{}.self_attention.linear_q_up_proj.weight": lambda d, v: (
        d.q_head_rows, d.q_lora_rank),
    "decoder.layers.{}.self_attention.linear_kv_down_proj.weight": lambda d, v: (
        d.kv_lora_rank + d.qk_rope_head_dim, d.hidden_size),
    "decoder.layers.{}.self_attention.linear_kv_up_proj.weight": lambda d, v: (
        d.num_attention_heads * (d.qk_nope_head_dim + d.v_head_dim), d.kv_lora_rank),
    "decoder.layers.{}.self_attention.kv_layernorm.weight": lambda d, v: (d.kv_lora_rank,),
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
    # Gated DeltaNet (megatron.core.ssm.gated_delta_net.GatedDeltaNet as self_attention)
    "decoder.layers.{}.self_attention.in_proj.weight": lambda d, v: (
        d.linear_in_proj_rows, d.hidden_size),
    "decoder.layers.{}.self_attention.conv1d.weight": lambda d, v: (
        d.linear_conv_dim, 1, d.linear_conv_kernel),
    "decoder.layers.{}.self_attention.A_log": lambda d, v: (d.linear_value_heads,),
    "decoder.layers.{}.self_attention.dt_bias": lambda d, v: (d.linear_value_heads,),
    "decoder.layers.{}.self_attention.out_norm.weight": lambda d, v: (d.linear_value_head_dim,),
    "decoder.layers.{}.self_attention.out_proj.weight": lambda d, v: (
        d.hidden_size, d.linear_v_dim),
}

# ``when`` conditions decided per layer (the others are per model, see ArchSpec.flags):
# dense / MoE MLP, DeltaNet ("linear") / full-attention token mixer.
LAYER_CONDITIONS = ("dense", "moe", "linear", "attention")


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


@dataclass(frozen=True)
class FusedQKVGate(Mapping):
    """Gated attention's ``linear_qkv`` <- q_proj (each head's queries then its output gate,
    ``[q_h; gate_h]`` head by head, as Qwen3.5 / Qwen3-Next store it), k_proj, v_proj. Megatron
    lays it out per query group as ``[q_g; gate_g; k_g; v_g]``."""

    q: str = ""
    k: str = ""
    v: str = ""
    hf_fields: ClassVar[tuple[str, ...]] = ("q", "k", "v")

    def hf_shapes(self, megatron_shape, dims):
        rest = megatron_shape[1:]
        kv = (dims.num_query_groups * dims.head_dim, *rest)
        return ((2 * dims.num_attention_heads * dims.head_dim, *rest), kv, kv)

    def to_megatron(self, hf, dims, padded_vocab):
        return merge_qkv_gate(*hf, num_query_groups=dims.num_query_groups,
                              head_dim=dims.head_dim)

    def to_hf(self, t, dims):
        return split_qkv_gate(t, num_query_groups=dims.num_query_groups,
                              num_heads=dims.num_attention_heads, head_dim=dims.head_dim)


@dataclass(frozen=True)
class DeltaNetInProj(Mapping):
    """Gated DeltaNet ``in_proj`` <- the four HF input projections, stacked along the output
    rows: ``[qkv (q, k, v heads); z; b; a]`` (Qwen3.5's in_proj_qkv, in_proj_z, in_proj_b,
    in_proj_a). Megatron splits each of the six sections (q, k, v, z, b, a) over tensor-parallel
    ranks on its own (``GatedDeltaNet.sharded_state_dict``), so the full tensor is a plain
    concatenation."""

    qkv: str = ""
    z: str = ""
    b: str = ""
    a: str = ""
    hf_fields: ClassVar[tuple[str, ...]] = ("qkv", "z", "b", "a")

    def hf_shapes(self, megatron_shape, dims):
        rest = megatron_shape[1:]
        return ((dims.linear_conv_dim, *rest), (dims.linear_v_dim, *rest),
                (dims.linear_value_heads, *rest), (dims.linear_value_heads, *rest))

    def to_megatron(self, hf, dims, padded_vocab):
        return torch.cat(hf, dim=0)

    def to_hf(self, t, dims):
        sizes = [s[0] for s in self.hf_shapes(tuple(t.shape), dims)]
        return tuple(p.contiguous() for p in torch.split(t, sizes, dim=0))


@dataclass(frozen=True)
class DeltaNetGroupedInProj(Mapping):
    """Gated DeltaNet ``in_proj`` <- Qwen3-Next's two fused projections, grouped by key head
    (``in_proj_qkvz``: per key head ``[q; k; v; z]``, ``in_proj_ba``: per key head ``[b; a]``),
    regrouped into megatron's ``[q; k; v; z; b; a]`` over all heads (``transforms``'s
    :func:`ungroup_qkvz_ba`)."""

    qkvz: str = ""
    ba: str = ""
    hf_fields: ClassVar[tuple[str, ...]] = ("qkvz", "ba")

    def _sizes(self, dims):
        return dict(key_heads=dims.linear_key_heads, key_dim=dims.linear_key_head_dim,
                    value_heads=dims.linear_value_heads, value_dim=dims.linear_value_head_dim)

    def hf_shapes(self, megatron_shape, dims):
        rest = megatron_shape[1:]
        return ((dims.linear_conv_dim + dims.linear_v_dim, *rest),
                (2 * dims.linear_value_heads, *rest))

    def to_megatron(self, hf, dims, padded_vocab):
        return ungroup_qkvz_ba(*hf, **self._sizes(dims))

    def to_hf(self, t, dims):
        return group_qkvz_ba(t, **self._sizes(dims))


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
    norm_topk_prob: bool | None = None
    """Whether the top-k probabilities are renormalised, when the architecture fixes it
    (Qwen3.5-MoE always does, without a config field); None: read ``norm_topk_prob``."""


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
    mla: bool = False
    """Multi-latent attention (megatron's ``MLASelfAttention`` and ``MLATransformerConfig``):
    a low-rank query (rows ``when="q_lora"``) or one ``q_proj`` (``when="no_q_lora"``), a
    compressed key/value latent, one rotary key shared by all heads."""
    extra_hf_layers: str | None = None
    """HF config attribute counting decoder layers stored after ``num_hidden_layers`` that the
    Megatron model does not hold (GLM-4.5's ``num_nextn_predict_layers`` MTP layers): the
    converter carries them through in a side file (``convert.py``)."""
    extra_hf_prefixes: tuple[str, ...] = ()
    """HF tensor name prefixes the Megatron model does not hold and the converter carries
    through the same way (Qwen3.5's ``mtp.`` multi-token-prediction head and, in its
    vision-language checkpoints, the ``model.visual.`` vision tower)."""
    linear_attention: bool = False
    """Gated-DeltaNet hybrid: HF ``layer_types`` picks megatron-core's ``GatedDeltaNet``
    (``"linear_attention"``) or full attention (``"full_attention"``) per layer
    (``experimental_attention_variant="gated_delta_net"`` with a ``linear_attention_freq`` list)."""
    attention_output_gate: bool = False
    """Full attention multiplies its output by a sigmoid gate computed from the input (megatron's
    ``attention_output_gate``; the gate rows live in HF's q_proj, see :class:`FusedQKVGate`)."""
    zero_centered_norms: bool = False
    """RMSNorms scale by ``1 + weight`` (Qwen3.5 / Qwen3-Next; megatron's
    ``layernorm_zero_centered_gamma``). The DeltaNet's gated output norm is a plain one."""
    text_config: str | None = None
    """Vision-language checkpoints: the HF config attribute holding the language model's config
    (``text_config``); :func:`~eaft_megatron.models.config.language_model_config` reads it."""

    def __post_init__(self):
        for m in self.mappings:
            if m.megatron not in MEGATRON_SHAPES:
                raise ValueError(
                    f"{self.hf_architecture}: no shape rule for Megatron name {m.megatron!r}; "
                    "add it to spec.MEGATRON_SHAPES"
                )
            if m.when not in (None, "qkv_bias", "qk_layernorm", "untied", "q_lora", "no_q_lora",
                              *LAYER_CONDITIONS):
                raise ValueError(f"{self.hf_architecture}: unknown mapping condition {m.when!r}")

    def flags(self, hf_config: Any) -> dict[str, bool]:
        """Values of the ``when`` conditions for this HF config."""
        qkv_bias = self.qkv_bias
        if isinstance(qkv_bias, str):
            qkv_bias = bool(getattr(hf_config, qkv_bias, False))
        qk_norm = self.qk_layernorm
        if isinstance(qk_norm, str):
            qk_norm = bool(getattr(hf_config, qk_norm, False))
        q_lora = bool(getattr(hf_config, "q_lora_rank", None))
        return dict(qkv_bias=bool(qkv_bias), qk_layernorm=bool(qk_norm),
                    untied=not getattr(hf_config, "tie_word_embeddings", False),
                    q_lora=q_lora, no_q_lora=not q_lora)

    def linear_layers(self, hf_config: Any) -> list[int]:
        """Per layer: 1 for a gated-DeltaNet layer, 0 for full attention (all 0 unless
        ``linear_attention``). Raises ValueError for a ``layer_types`` entry megatron-core has
        no layer for."""
        n = hf_config.num_hidden_layers
        if not self.linear_attention:
            return [0] * n
        kinds = list(getattr(hf_config, "layer_types", None) or [])
        known = {"linear_attention": 1, "full_attention": 0}
        if len(kinds) != n or any(k not in known for k in kinds):
            bad = sorted({k for k in kinds if k not in known})
            why = f"unknown layer types {bad}" if bad else f"{len(kinds)} entries for {n} layers"
            raise ValueError(f"{self.hf_architecture}: layer_types cannot be expressed in "
                             f"megatron-core ({why}; each layer must be 'linear_attention' or "
                             "'full_attention')")
        return [known[k] for k in kinds]

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
