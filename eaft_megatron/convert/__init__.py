"""Checkpoint conversion between Hugging Face and Megatron-Core (torch_dist) formats."""

from ..checkpoint import checkpoint_tensor_shapes, validate_checkpoint_metadata
from .convert import hf_to_megatron, load_hf_config, megatron_to_hf
from .io import ConversionError

__all__ = ["ConversionError", "checkpoint_tensor_shapes", "hf_to_megatron", "load_hf_config",
           "megatron_to_hf", "validate_checkpoint_metadata"]
