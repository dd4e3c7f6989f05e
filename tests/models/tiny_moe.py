"""Tiny random mixture-of-experts HF models whose routers really route.

8 experts, top-2 (several experts per token), router weights drawn large enough that the
softmax is far from uniform (uneven expert load), every other tensor random too (norms and
biases included). The tensors are those ``save_pretrained`` writes: one per expert
(transformers >= 5 fuses experts in memory and splits them again on save).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

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


def randomize_moe_(model: torch.nn.Module, seed: int) -> None:
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


def build_moe(case: str, directory: Path, seed: int = 0):
    """Save a tiny random model of ``case`` to ``directory``; return (config, model, tensors
    as saved)."""
    config = MOE_CASES[case]()
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32)
    randomize_moe_(model, seed)
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
    import json

    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return load_file(directory / "model.safetensors")
    out = {}
    for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(directory / f))
    return out


def tokens(vocab_size: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(3))
