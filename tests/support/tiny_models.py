"""Tiny random Hugging Face models for the tests, importable in spawned ranks.

Dense cases (``CASES``, ``build``): every parameter is drawn at random, norms and biases included
(HF initialises norms to 1 and biases to 0, which would hide a swapped mapping). Sizes exercise GQA
(2 query groups), head_dim != hidden/heads (Qwen3, GLM-4-0414), vocabularies that need padding, tied
and untied embeddings, GLM's default and explicit partial rotary factors.

Mixtures of experts (``MOE_CASES``, ``build_moe``) whose routers really route: 8 experts, top-2
(several experts per token), router weights drawn large enough that the softmax is far from
uniform (uneven expert load), every other tensor random too (norms and biases included). The
tensors are those ``save_pretrained`` writes: one per expert (transformers >= 5 fuses experts in
memory and splits them again on save).

The training tests' Qwen3 (``train_config``, ``build_train_model``): larger-than-default weights,
so its entropies spread.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

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


BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, vocab_size=300)

MOE_CASES = {
    # layer 1 dense (mlp_only_layers): moe_layer_freq [1, 0, 1, 1]
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        architectures=["Qwen3MoeForCausalLM"], head_dim=24, rope_theta=1e6, rms_norm_eps=1e-6,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        mlp_only_layers=[1], router_aux_loss_coef=0.01, tie_word_embeddings=False, **BASE),
    # shared expert with its sigmoid gate, q/k/v bias, top-k probabilities not renormalised,
    # every other layer sparse (decoder_sparse_step 2): moe_layer_freq [0, 1, 0, 1]
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        architectures=["Qwen2MoeForCausalLM"], rope_theta=1e6, rms_norm_eps=1e-6,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
        shared_expert_intermediate_size=48, decoder_sparse_step=2, router_aux_loss_coef=0.01,
        tie_word_embeddings=True, **BASE),
    # sigmoid router + e_score_correction_bias, grouped top-k (4 groups, 2 chosen, top-4),
    # routed scaling, shared expert, first layer dense, q/k norms, bias, partial rotary 0.5,
    # one multi-token-prediction layer stored after the last (carried through as extra tensors)
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        architectures=["Glm4MoeForCausalLM"], head_dim=32, rope_theta=10000.0,
        rms_norm_eps=1e-5, n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
        partial_rotary_factor=0.5, num_nextn_predict_layers=1, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, **BASE),
}

# What a GLM-4.5 checkpoint stores for an MTP layer besides a full decoder layer's tensors.
MTP_TENSORS = {"eh_proj.weight": (64, 128), "enorm.weight": (64,), "hnorm.weight": (64,),
               "shared_head.norm.weight": (64,), "input_layernorm.weight": (64,),
               "self_attn.q_proj.weight": (128, 64), "mlp.gate.e_score_correction_bias": (8,),
               "mlp.experts.0.down_proj.weight": (64, 32)}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norms around 1; MoE routers peaked; expert-bias buffers random."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif name.endswith(".bias") or "embed" in name:
                p.copy_(0.3 * noise)
            elif name.endswith("mlp.gate.weight"):  # router: peaked, uneven routing
                p.copy_(3 * noise / p.shape[-1] ** 0.5)
            else:  # linear [out, in] or fused experts [E, out, in]
                p.copy_(noise / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


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


def build_moe(case: str, directory: Path, seed: int = 0):
    """Save a tiny random model of ``case`` to ``directory``; return (config, model, tensors
    as saved)."""
    config = MOE_CASES[case]()
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(directory)
    (Path(directory) / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    saved = read_saved(Path(directory))
    mtp = getattr(config, "num_nextn_predict_layers", 0) or 0
    if mtp:  # transformers neither builds nor saves them: add them as real checkpoints have
        from safetensors.torch import save_file

        gen = torch.Generator().manual_seed(seed + 1)
        for i in range(mtp):
            for leaf, shape in MTP_TENSORS.items():
                name = f"model.layers.{config.num_hidden_layers + i}.{leaf}"
                saved[name] = torch.randn(shape, generator=gen)
        assert not (Path(directory) / "model.safetensors.index.json").exists()
        save_file(saved, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})
    return config, model, saved


def read_saved(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return load_file(directory / "model.safetensors")
    out = {}
    for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(directory / f))
    return out


TRAIN_VOCAB = 300  # padded to 384 in the checkpoint


def train_config():
    """The training tests' tiny Qwen3 (2 layers, hidden 64, GQA, untied)."""
    return transformers.Qwen3Config(
        architectures=["Qwen3ForCausalLM"], vocab_size=TRAIN_VOCAB, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=64, tie_word_embeddings=False, rope_theta=10000.0,
        rms_norm_eps=1e-6, dtype="float32")


def build_train_model(out: Path, seed: int = 0) -> Path:
    """A random tiny Qwen3 saved with ``save_pretrained`` (safetensors, fp32)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(train_config(), dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights: a spread of entropies, not ~uniform
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[1] if p.dim() == 2 and "embed" not in name else 1
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in ** 0.5
                                                                if fan_in > 1 else 1.0))
    model.save_pretrained(out)
    return out


def build_demo_moe(directory: Path) -> Path:
    """A random Qwen3-MoE (8 experts, top-2, one dense layer) sized to a tokenizer trained
    like the demo's own, both saved in ``directory``."""
    from eaft_megatron.demo.assets import BUNDLED_DATA, train_tokenizer

    train_tokenizer(BUNDLED_DATA, directory, vocab_size=400)
    vocab = len(transformers.AutoTokenizer.from_pretrained(directory))
    config = transformers.Qwen3MoeConfig(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=vocab, hidden_size=64,
        intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1], num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0,
        dtype="float32")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
        directory)
    return directory


def build_demo_qwen3_5(directory: Path) -> Path:
    """A random gated-DeltaNet hybrid ``Qwen3_5ForCausalLM`` (one DeltaNet layer, one gated
    attention layer; 4/2 attention heads and 2/4 DeltaNet key/value heads, so TP=2 divides
    them) sized to a tokenizer trained like the demo's own, both saved in ``directory``."""
    from eaft_megatron.demo.assets import BUNDLED_DATA, train_tokenizer

    train_tokenizer(BUNDLED_DATA, directory, vocab_size=400)
    vocab = len(transformers.AutoTokenizer.from_pretrained(directory))
    config = transformers.Qwen3_5TextConfig(
        architectures=["Qwen3_5ForCausalLM"], vocab_size=vocab, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, layer_types=["linear_attention",
                                                                "full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=2, pad_token_id=0, dtype="float32")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
        directory)
    return directory


def tokens(vocab_size: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(3))
