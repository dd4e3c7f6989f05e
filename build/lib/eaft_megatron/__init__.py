"""eaft-megatron: Entropy-Adaptive Fine-Tuning (EAFT) for Megatron-Core.

The core is :func:`vocab_parallel_eaft_cross_entropy`, a drop-in for Megatron-Core's
``tensor_parallel.vocab_parallel_cross_entropy`` that scales each token's cross-entropy by a
detached weight (SFT: 1, DFT: p_target, EAFT: normalised top-k entropy) without gathering the
vocab-parallel logits.
"""

from .ops import EAFTTokenStats, fused_linear_eaft_cross_entropy, vocab_parallel_eaft_cross_entropy

__version__ = "0.1.0"
__all__ = [
    "EAFTTokenStats",
    "fused_linear_eaft_cross_entropy",
    "vocab_parallel_eaft_cross_entropy",
    "__version__",
]
