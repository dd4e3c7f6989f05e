"""Table rows shared by the Llama-like decoders (Qwen2/3, GLM-4): embeddings, final norm, head.

``M`` and ``H`` are the per-layer name prefixes on the Megatron and HF sides; ``{}`` is the
layer index.
"""

from __future__ import annotations

from .spec import Rename, VocabRows

M = "decoder.layers.{}."
H = "model.layers.{}."

EMBEDDING = VocabRows("embedding.word_embeddings.weight", "model.embed_tokens.weight")
FINAL_NORM = Rename("decoder.final_layernorm.weight", "model.norm.weight")
# Tied models (small Qwen2.5 / Qwen3) have no lm_head: Megatron reuses the embedding.
OUTPUT_LAYER = VocabRows("output_layer.weight", "lm_head.weight", when="untied")
