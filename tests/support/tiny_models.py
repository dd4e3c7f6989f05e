"""Tiny random HF models for the model-layer tests, importable in spawned ranks.

Every parameter is drawn at random, norms and biases included (HF initialises norms to 1 and
biases to 0, which would hide a swapped mapping). Sizes exercise GQA (2 query groups),
head_dim != hidden/heads (Qwen3, GLM-4-0414), vocabularies that need padding, tied and untied
embeddings, GLM's default and explicit partial rotary factors.
"""

from __future__ import annotations

import torch
import transformers

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
# GLM configs default pad/eos ids beyond a tiny vocabulary.
GLM_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=None)

CASES = {
    "qwen2": lambda: transformers.Qwen2Config(
        architectures=["Qwen2ForCausalLM"], vocab_size=300, tie_word_embeddings=False,
        rope_theta=1e6, rms_norm_eps=1e-6, **COMMON),
    "qwen2_tied": lambda: transformers.Qwen2Config(
        architectures=["Qwen2ForCausalLM"], vocab_size=200, tie_word_embeddings=True,
        rope_theta=10000.0, rms_norm_eps=1e-5, **COMMON),
    "qwen3": lambda: transformers.Qwen3Config(
        architectures=["Qwen3ForCausalLM"], vocab_size=300, tie_word_embeddings=True,
        head_dim=24, rope_theta=1e6, rms_norm_eps=1e-6, **COMMON),
    "glm": lambda: transformers.GlmConfig(  # partial_rotary_factor left to the default (0.5)
        architectures=["GlmForCausalLM"], vocab_size=300, head_dim=16, rope_theta=10000.0,
        **GLM_IDS, **COMMON),
    "glm4": lambda: transformers.Glm4Config(
        architectures=["Glm4ForCausalLM"], vocab_size=300, head_dim=32, rope_theta=5000.0,
        partial_rotary_factor=0.25, **GLM_IDS, **COMMON),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            elif "embed" in name:
                p.copy_(0.3 * noise)
            else:  # linear [out, in]
                p.copy_(noise / p.shape[1] ** 0.5)


def build(case: str, seed: int = 0):
    """(hf_config, model, saved state dict) of a tiny random model, fp32, eval mode.

    The saved state dict is what ``save_pretrained`` writes: no lm_head when tied.
    """
    config = CASES[case]()
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    model.eval()
    state = dict(model.state_dict())
    if config.tie_word_embeddings:
        assert state["lm_head.weight"] is state["model.embed_tokens.weight"] or torch.equal(
            state["lm_head.weight"], state["model.embed_tokens.weight"])
        del state["lm_head.weight"]
    return config, model, state


def tokens(vocab_size: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(3))
