"""Stream a model's tensors between HF and Megatron-Core names and layouts.

    arch = get_arch(hf_config)
    with safe_open(path, "pt") as f:                       # caller's I/O, one tensor at a time
        for name, tensor in hf_to_megatron(arch, hf_config, f.get_tensor, padded_vocab=384):
            ...                                            # full (TP=1) Megatron tensors
    for name, tensor in megatron_to_hf(arch, hf_config, full_megatron_tensor):
        ...

Names on the Megatron side are the ``state_dict()`` keys (without ``_extra_state``) of a
TP=1/PP=1 ``build_gpt_model`` model. The layer spec decides two of them: TransformerEngine fuses
the input and pre-MLP norms into the next linear, so with ``te=True``::

    decoder.layers.{i}.input_layernorm.weight
        -> decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight
    decoder.layers.{i}.pre_mlp_layernorm.weight
        -> decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight

``te=None`` (the default) means "as ``build_gpt_model`` builds by default", i.e. TE exactly when
it is importable; pass ``te=(config.transformer_impl == "transformer_engine")`` to follow a
given config. (Megatron's torch_dist checkpoints always use the TE names: the local spec maps
its names to them in ``sharded_state_dict``.)

Every function is a pure generator over ``get``: nothing is cached, each HF tensor is fetched
exactly once, and a Megatron tensor is yielded as soon as its inputs are read.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator
from typing import Any

import torch

from .config import te_available
from .spec import LAYER_CONDITIONS, MEGATRON_SHAPES, ArchSpec, Mapping, ModelDims, VocabRows
from .transforms import fill_layer

__all__ = [
    "TE_RENAMES",
    "fill_names",
    "hf_names",
    "hf_to_megatron",
    "megatron_names",
    "megatron_shapes",
    "megatron_to_hf",
    "to_te_name",
]

# Local-spec name suffix -> TransformerEngine-spec name suffix (megatron's own local spec
# declares the same correspondence in its sharded_state_dict_keys_map).
TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

Getter = Callable[[str], torch.Tensor]


# Multi-latent attention: TE keeps the input norm separate (the down projections are plain
# linears) and fuses the latent norms into the up projections.
TE_RENAMES_MLA = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
    "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
}


def to_te_name(name: str, *, moe_layer: bool = False, linear_layer: bool = False,
               mla: bool = False) -> str:
    """The TransformerEngine-spec name of a local-spec Megatron parameter name.

    In a MoE layer the pre-MLP norm stays a separate module (no fused linear follows it); in a
    gated-DeltaNet layer the input norm is fused into the DeltaNet's ``in_proj``; with
    multi-latent attention (``mla``) see ``TE_RENAMES_MLA``."""
    prefix, _, leaf = name.rpartition(".layers.")
    if prefix:
        index, _, rest = leaf.partition(".")
        if moe_layer and rest == "pre_mlp_layernorm.weight":
            return name
        if mla and rest in TE_RENAMES_MLA:
            return f"{prefix}.layers.{index}.{TE_RENAMES_MLA[rest]}"
        if linear_layer and rest == "input_layernorm.weight":
            return f"{prefix}.layers.{index}.self_attention.in_proj.layer_norm_weight"
        if rest in TE_RENAMES:
            return f"{prefix}.layers.{index}.{TE_RENAMES[rest]}"
    return name


Step = tuple[Mapping, int | None, int | None]


def _steps(arch: ArchSpec, hf_config: Any) -> Iterator[Step]:
    """(mapping, layer, expert) in conversion order: leading whole-model rows, then layer by
    layer (per-expert rows once per routed expert, ``dense`` / ``moe`` rows only in layers of
    that kind, ``linear`` / ``attention`` rows only in DeltaNet / full-attention layers), the
    rest."""
    maps = arch.active_mappings(hf_config)
    first = next((i for i, m in enumerate(maps) if m.per_layer), len(maps))
    for m in maps[:first]:
        yield m, None, None
    dims = ModelDims.from_hf(hf_config)
    linear = arch.linear_layers(hf_config)
    for layer, moe in enumerate(arch.moe_layers(hf_config)):
        kinds = ("moe" if moe else "dense", "linear" if linear[layer] else "attention")
        for m in maps:
            if not m.per_layer or (m.when in LAYER_CONDITIONS and m.when not in kinds):
                continue
            for expert in (range(dims.num_experts) if m.per_expert else (None,)):
                yield m, layer, expert
    for m in maps[first:]:
        if not m.per_layer:
            yield m, None, None


def fill_names(template: str, layer: int | None, expert: int | None = None) -> str:
    """Fill a name template's layer (and expert) placeholders."""
    if expert is None:
        return fill_layer(template, layer)
    if template.count("{}") != 2 or layer is None:
        raise ValueError(f"name template {template!r} needs a layer and an expert index")
    return template.format(layer, expert)


def _name(m: Mapping, layer: int | None, te: bool, expert: int | None = None,
          moe_layer: bool = False, linear_layer: bool = False, mla: bool = False) -> str:
    name = fill_names(m.megatron, layer, expert)
    return to_te_name(name, moe_layer=moe_layer, linear_layer=linear_layer, mla=mla) if te \
        else name


def _te(te: bool | None) -> bool:
    return te_available() if te is None else te


def _named_steps(arch: ArchSpec, hf_config: Any, te: bool
                 ) -> Iterator[tuple[Mapping, int | None, int | None, str]]:
    moe, linear = arch.moe_layers(hf_config), arch.linear_layers(hf_config)
    for m, layer, expert in _steps(arch, hf_config):
        is_moe = layer is not None and bool(moe[layer])
        is_linear = layer is not None and bool(linear[layer])
        yield m, layer, expert, _name(m, layer, te, expert, is_moe, is_linear, arch.mla)


def hf_names(arch: ArchSpec, hf_config: Any) -> list[str]:
    """Every HF tensor name :func:`hf_to_megatron` reads (tied models: no ``lm_head.weight``)."""
    return [fill_names(h, layer, expert) for m, layer, expert in _steps(arch, hf_config)
            for h in m.hf]


def megatron_names(arch: ArchSpec, hf_config: Any, *, te: bool | None = None) -> list[str]:
    """Every parameter (and persistent buffer, e.g. the router's ``expert_bias``) name of the
    TP=1/PP=1 model, in the order the converters yield them."""
    return [name for *_, name in _named_steps(arch, hf_config, _te(te))]


def megatron_shapes(arch: ArchSpec, hf_config: Any, *, padded_vocab: int,
                    te: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Full (TP=1) shape of every Megatron parameter, keyed like :func:`megatron_names`."""
    dims = ModelDims.from_hf(hf_config)
    return {name: MEGATRON_SHAPES[m.megatron](dims, padded_vocab)
            for m, _, _, name in _named_steps(arch, hf_config, _te(te))}


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def hf_to_megatron(arch: ArchSpec, hf_config: Any, get: Getter, *, padded_vocab: int,
                   te: bool | None = None, only: Container[str] | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Megatron name, full tensor) for every parameter, reading HF tensors via ``get``.

    Vocabulary rows are padded with zeros to ``padded_vocab``. Dtypes are kept. Raises
    ValueError naming the tensor and both shapes when a HF tensor has the wrong shape.
    ``only``: yield just these Megatron names (the HF tensors of the others are not read).
    """
    te, dims = _te(te), ModelDims.from_hf(hf_config)
    if padded_vocab < dims.vocab_size:
        raise ValueError(f"padded_vocab={padded_vocab} < vocab_size={dims.vocab_size}")
    for m, layer, expert, name in _named_steps(arch, hf_config, te):
        if only is not None and name not in only:
            continue
        expected = MEGATRON_SHAPES[m.megatron](dims, padded_vocab)
        tensors = []
        for template, shape in zip(m.hf, m.hf_shapes(expected, dims)):
            hf_name = fill_names(template, layer, expert)
            t = get(hf_name)
            if _shape(t) != shape:
                raise ValueError(
                    f"HF tensor {hf_name!r} has shape {_shape(t)}, expected {shape} "
                    f"(for Megatron {name!r})"
                )
            tensors.append(t)
        out = m.to_megatron(tuple(tensors), dims, padded_vocab)
        assert _shape(out) == expected, (name, _shape(out), expected)
        yield name, out


def megatron_to_hf(arch: ArchSpec, hf_config: Any, get: Getter, *, te: bool | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every HF tensor, reading full Megatron tensors via ``get``.

    Vocabulary padding (any number of rows >= vocab_size) is cut. ``lm_head.weight`` is written
    only when the HF config is untied. Raises ValueError naming the tensor and both shapes.
    """
    te, dims = _te(te), ModelDims.from_hf(hf_config)
    for m, layer, expert, name in _named_steps(arch, hf_config, te):
        t = get(name)
        padded = t.shape[0] if isinstance(m, VocabRows) and t.shape[0] >= dims.vocab_size else \
            dims.vocab_size
        expected = MEGATRON_SHAPES[m.megatron](dims, padded)
        if _shape(t) != expected:
            if isinstance(m, VocabRows):
                expected = f"(>= {dims.vocab_size}, {', '.join(map(str, expected[1:]))})"
            raise ValueError(f"Megatron tensor {name!r} has shape {_shape(t)}, expected {expected}")
        for template, out in zip(m.hf, m.to_hf(t, dims)):
            yield fill_names(template, layer, expert), out
