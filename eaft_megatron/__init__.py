"""eaft-megatron: Entropy-Adaptive Fine-Tuning (EAFT) for Megatron-Core.

The core is :func:`vocab_parallel_eaft_cross_entropy`, a drop-in for Megatron-Core's
``tensor_parallel.vocab_parallel_cross_entropy`` that scales each token's cross-entropy by a
detached weight (SFT: 1, DFT: p_target, EAFT: normalised top-k entropy) without gathering the
vocab-parallel logits.

The loss names below are imported on first use (module ``__getattr__``): ``import
eaft_megatron`` -- and so the ``eaft-megatron`` command and its ``--help`` -- loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_LAZY = {
    "EAFTTokenStats": ".ops",
    "fused_linear_eaft_cross_entropy": ".ops",
    "vocab_parallel_eaft_cross_entropy": ".ops",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
