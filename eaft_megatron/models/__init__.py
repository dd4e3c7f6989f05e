"""Qwen and GLM models in Megatron-Core: HF config -> TransformerConfig, layer spec, GPTModel,
and the HF <-> Megatron tensor mapping that ``eaft_megatron.convert`` streams through.

One file per architecture, each mostly a table (``qwen2.py``, ``qwen3.py``, ``glm.py``,
``glm4.py``), registered in ``registry.py``; the table vocabulary is in ``spec.py``, the pure
tensor transforms in ``transforms.py``. Supported ``architectures[0]``: Qwen2ForCausalLM
(Qwen2, Qwen2.5), Qwen3ForCausalLM, GlmForCausalLM (GLM-4-9B), Glm4ForCausalLM (GLM-4-0414).
Mixture-of-Experts models (Qwen3-MoE, GLM-4.5) go in the same way: see ``spec.py``.

    hf = transformers.AutoConfig.from_pretrained(local_dir)
    arch = get_arch(hf)
    check_parallel_sizes(hf, tp, pp)
    model = build_gpt_model(hf, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    for name, tensor in hf_to_megatron(arch, hf, get_hf_tensor, padded_vocab=...): ...
    for name, tensor in megatron_to_hf(arch, hf, get_megatron_tensor): ...
"""

from .config import (
    ARCH_CONFIG_FIELDS,
    check_config_matches,
    check_parallel_sizes,
    default_transformer_impl,
    gpt_model_kwargs,
    language_model_config,
    linear_attention_config_from_hf,
    padded_vocab_size,
    rope_from_hf,
    te_available,
    transformer_config_from_hf,
)
from .mapping import (
    TE_RENAMES,
    hf_names,
    hf_to_megatron,
    megatron_names,
    megatron_shapes,
    megatron_to_hf,
    to_te_name,
)
from .registry import ARCHITECTURES, get_arch
from .spec import ArchSpec, ModelDims

__all__ = [
    "ARCHITECTURES",
    "ARCH_CONFIG_FIELDS",
    "ArchSpec",
    "ModelDims",
    "TE_RENAMES",
    "build_gpt_model",
    "check_config_matches",
    "check_parallel_sizes",
    "default_transformer_impl",
    "get_arch",
    "gpt_model_kwargs",
    "hf_names",
    "hf_to_megatron",
    "language_model_config",
    "layer_spec",
    "linear_attention_config_from_hf",
    "megatron_names",
    "megatron_shapes",
    "megatron_to_hf",
    "padded_vocab_size",
    "rope_from_hf",
    "te_available",
    "to_te_name",
    "transformer_config_from_hf",
]


def __getattr__(name):
    # The Megatron-Core model classes are imported on first use, so the mapping tables and
    # config helpers stay importable (and cheap) without building anything.
    if name == "build_gpt_model":
        from .model import build_gpt_model

        return build_gpt_model
    if name == "layer_spec":
        from .layers import layer_spec

        return layer_spec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
