"""Tiny inputs for the training tests: a random Qwen3 HF model, its converted checkpoint, and
prepared (tokenized) SFT data. ``python -m tests.train.fixtures OUT`` builds them by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

VOCAB = 300  # padded to 384 in the checkpoint
SEQ = 32


def hf_config():
    import transformers

    return transformers.Qwen3Config(
        architectures=["Qwen3ForCausalLM"], vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=64, tie_word_embeddings=False, rope_theta=10000.0,
        rms_norm_eps=1e-6, dtype="float32")


def build_hf_model(out: Path, seed: int = 0) -> Path:
    """A random tiny Qwen3 saved with ``save_pretrained`` (safetensors, fp32)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(), dtype=torch.float32)
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


def write_data(prefix: Path, *, n: int = 24, seed: int = 0, pack: bool = False) -> Path:
    """Tokenized conversations (a prompt of -100 labels, then a supervised reply), prepared
    with ``eaft_megatron.data.preprocess``. Replies follow a simple rule (next = prev + 1 mod
    V) so training can lower the loss quickly."""
    from eaft_megatron.data import preprocess

    rng = np.random.default_rng(seed)
    jsonl = prefix.parent / f"{prefix.name}.jsonl"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(jsonl, "w") as f:
        for _ in range(n):
            length = int(rng.integers(10, SEQ - 2))
            prompt = int(rng.integers(3, 8))
            start = int(rng.integers(2, VOCAB))
            ids = [int(x) for x in rng.integers(2, VOCAB, prompt)]
            ids += [(start + i) % (VOCAB - 2) + 2 for i in range(length - prompt)]
            labels = [-100] * prompt + ids[prompt:]
            f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
    preprocess([jsonl], output_prefix=prefix, seq_length=SEQ, fmt="tokenized", pack=pack,
               progress=False)
    return prefix


def build_all(root: Path) -> dict[str, Path]:
    from eaft_megatron.convert import hf_to_megatron

    root.mkdir(parents=True, exist_ok=True)
    hf = build_hf_model(root / "hf_model")
    ckpt = hf_to_megatron(hf, root / "mcore", tp=1, pp=1, dtype="fp32", progress=False)
    data = write_data(root / "data" / "train")
    return {"hf": hf, "ckpt": ckpt, "data": data}


if __name__ == "__main__":
    print(build_all(Path(sys.argv[1])))
