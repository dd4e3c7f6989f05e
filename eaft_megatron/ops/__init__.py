"""Loss maths: the vocab-parallel SFT / DFT / EAFT cross-entropy and its per-token gates."""

from .gates import ENTROPY_MODES, LOSS_TYPES, token_weight, validate_gate_options
from .vocab_parallel import EAFTTokenStats, vocab_parallel_eaft_cross_entropy

__all__ = [
    "ENTROPY_MODES",
    "LOSS_TYPES",
    "EAFTTokenStats",
    "token_weight",
    "validate_gate_options",
    "vocab_parallel_eaft_cross_entropy",
]
