"""HF ``architectures[0]`` -> :class:`~eaft_megatron.models.spec.ArchSpec`.

To add an architecture, write its table in its own file next to ``qwen3.py`` and list it in
``ARCHITECTURES``; ``spec.py``'s docstring says what MoE adds.
"""

from __future__ import annotations

from typing import Any

from .glm import GLM
from .glm4 import GLM4
from .glm4_moe import GLM4_MOE
from .qwen2 import QWEN2
from .qwen2_moe import QWEN2_MOE
from .qwen3 import QWEN3
from .qwen3_moe import QWEN3_MOE
from .spec import ArchSpec

__all__ = ["ARCHITECTURES", "get_arch"]

ARCHITECTURES: dict[str, ArchSpec] = {
    a.hf_architecture: a for a in (QWEN2, QWEN3, GLM, GLM4, QWEN2_MOE, QWEN3_MOE, GLM4_MOE)}


def get_arch(hf_config: Any) -> ArchSpec:
    """The spec for ``hf_config.architectures[0]`` (a ``transformers`` config object).

    Raises ValueError naming the architecture and listing the supported ones.
    """
    archs = getattr(hf_config, "architectures", None) or []
    name = archs[0] if archs else None
    if name not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {name!r} (config.architectures={archs!r}); "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[name]
