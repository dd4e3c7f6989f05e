"""Tiny inputs for the training tests: the random Qwen3 of ``tiny_models.build_train_model``,
its converted checkpoint, and prepared (tokenized) SFT data. ``python -m tests.support.fixtures
OUT`` builds them by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .tiny_models import TRAIN_VOCAB as VOCAB
from .tiny_models import build_train_model

SEQ = 32


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
    hf = build_train_model(root / "hf_model")
    ckpt = hf_to_megatron(hf, root / "mcore", tp=1, pp=1, dtype="fp32", progress=False)
    data = write_data(root / "data" / "train")
    return {"hf": hf, "ckpt": ckpt, "data": data}


if __name__ == "__main__":
    print(build_all(Path(sys.argv[1])))
