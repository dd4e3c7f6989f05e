"""Checkpoint conversion between Hugging Face and Megatron-Core (torch_dist) formats."""

from .convert import hf_to_megatron, load_hf_config, megatron_to_hf
from .io import ConversionError

__all__ = ["ConversionError", "hf_to_megatron", "load_hf_config", "megatron_to_hf"]
