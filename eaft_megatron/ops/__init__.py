"""Loss maths: the vocab-parallel SFT / DFT / EAFT cross-entropy and its per-token gates."""

from .fused_linear import fused_linear_eaft_cross_entropy
from .gates import ENTROPY_MODES, LOSS_TYPES, token_weight, validate_gate_options
from .triton_eaft import IMPLS
from .vocab_parallel import EAFTTokenStats, vocab_parallel_eaft_cross_entropy

__all__ = [
    "ENTROPY_MODES",
    "IMPLS",
    "LOSS_TYPES",
    "EAFTTokenStats",
    "fused_linear_eaft_cross_entropy",
    "token_weight",
    "validate_gate_options",
    "vocab_parallel_eaft_cross_entropy",
]
