"""HF ``architectures[0]`` -> :class:`~eaft_megatron.models.spec.ArchSpec`.

To add an architecture, write its table in its own file next to ``qwen3.py`` and list it in
``ARCHITECTURES``; ``spec.py``'s docstring says what MoE adds.
"""

from __future__ import annotations

from typing import Any

from .glm import GLM
from .glm4 import GLM4
from .glm4_moe import GLM4_MOE
from .glm4_moe_lite import GLM4_MOE_LITE
from .qwen2 import QWEN2
from .qwen2_moe import QWEN2_MOE
from .qwen3 import QWEN3
from .qwen3_5 import QWEN3_5, QWEN3_5_VL
from .qwen3_5_moe import QWEN3_5_MOE, QWEN3_5_MOE_VL
from .qwen3_next import QWEN3_NEXT
from .qwen3_moe import QWEN3_MOE
from .spec import ArchSpec

__all__ = ["ARCHITECTURES", "UNSUPPORTED", "get_arch"]

ARCHITECTURES: dict[str, ArchSpec] = {
    a.hf_architecture: a for a in (QWEN2, QWEN3, GLM, GLM4, QWEN2_MOE, QWEN3_MOE, GLM4_MOE,
                                   GLM4_MOE_LITE,
                                   QWEN3_5, QWEN3_5_VL, QWEN3_5_MOE, QWEN3_5_MOE_VL,
                                   QWEN3_NEXT)}


# Architectures that transformers 5.x ships next to the supported ones and that are refused with
# what megatron-core 0.19 (or this package) lacks for them: HF architecture -> reason.
UNSUPPORTED: dict[str, str] = {
    "GlmMoeDsaForCausalLM": (
        "GLM-5 (glm_moe_dsa) uses DeepSeek sparse attention (a top-k token indexer on top of "
        "multi-latent attention); megatron-core 0.19's DSA is experimental and needs GPU-only "
        "kernels (fast_hadamard_transform, tilelang), and no table maps the indexer tensors"),
    "Qwen4ExpForCausalLM": (
        "qwen4_exp has hyper-connection residual streams (gated residual), hashed n-gram "
        "per-layer embeddings (PLE) and a QSA sparse-attention indexer, none of which "
        "megatron-core 0.19 has"),
    "Qwen4ExpForConditionalGeneration": (
        "qwen4_exp has hyper-connection residual streams (gated residual), hashed n-gram "
        "per-layer embeddings (PLE) and a QSA sparse-attention indexer, none of which "
        "megatron-core 0.19 has"),
    "Glm5NextForConditionalGeneration": (
        "glm5_next has manifold-constrained hyper-connections and Kimi-style linear attention "
        "(KDA with a forget gate), which megatron-core 0.19 does not have"),
    "Glm4vMoeForConditionalGeneration": (
        "GLM-4.5V's language model uses 3-D multimodal rotary embeddings (M-RoPE), which the "
        "GLM-4.5 table does not map; only its text-only sibling Glm4MoeForCausalLM converts"),
    "Glm46VForConditionalGeneration": (
        "GLM-4.6V's language model uses 3-D multimodal rotary embeddings (M-RoPE), which no "
        "table here maps"),
}


def get_arch(hf_config: Any) -> ArchSpec:
    """The spec for ``hf_config.architectures[0]`` (a ``transformers`` config object).

    Raises ValueError naming the architecture and, for the known unsupported ones
    (:data:`UNSUPPORTED`), what is missing; otherwise listing the supported ones.
    """
    archs = getattr(hf_config, "architectures", None) or []
    name = archs[0] if archs else None
    if name in UNSUPPORTED:
        raise ValueError(f"architecture {name} is not supported: {UNSUPPORTED[name]}")
    if name not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {name!r} (config.architectures={archs!r}); "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[name]
