"""``python -m eaft_megatron.train`` on the newest MoE architectures: Megatron's real loop,
torchrun, gloo, CPU, fp32, expert parallelism 2.

    python -m pytest -q tests/train/test_new_moe_train.py

Tiny random models saved by transformers and converted (``convert hf-to-megatron``):
``Glm4MoeLiteForCausalLM`` (GLM-4.7-Flash: multi-latent attention; the model of
``tests/models/test_glm4_moe_lite.py``), ``Qwen3_5MoeForCausalLM`` and ``Qwen3NextForCausalLM``
(gated-DeltaNet hybrids; those of ``tests/models/test_qwen3_5_moe.py``), and the 24 tokenized
conversations of ``tests/support/fixtures.py`` (not packed: the DeltaNet hybrids refuse packed
data on CPU). One launch per model: 6 iterations at EP=2 on 2 ranks (the Megatron-LM flags for
megatron's MLA / DeltaNet and MoE layers come from the HF config), saved, exported with
``convert megatron-to-hf`` and loaded by transformers: the losses fall, and transformers' own
cross-entropy on the 24 conversations is lower for the exported model than for the source.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.launch import ROOT, check, run_train, subprocess_env, run_module


CASES = ("glm4_moe_lite", "qwen3_5_moe", "qwen3_next")


def _config(case: str):
    from tests.models import test_glm4_moe_lite, test_qwen3_5_moe

    if case == "glm4_moe_lite":
        return test_glm4_moe_lite.lite_config(num_nextn_predict_layers=0), \
            test_glm4_moe_lite._randomize
    return test_qwen3_5_moe.CASES["text" if case == "qwen3_5_moe" else "next"](), \
        test_qwen3_5_moe._randomize


def build(root: Path) -> None:
    import transformers

    from eaft_megatron.convert import hf_to_megatron
    from tests.support.fixtures import write_data

    for case in CASES:
        config, randomize = _config(case)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=torch.float32)
        randomize(model, 0)
        model.save_pretrained(root / case / "hf")
        (root / case / "hf" / "tokenizer_config.json").write_text(
            '{"model_max_length": 256}\n')
        hf_to_megatron(root / case / "hf", root / case / "mcore", tp=1, pp=1, dtype="fp32",
                       progress=False)
    write_data(root / "data" / "train")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_moe_train")
    subprocess.run([sys.executable, "-m", "tests.train.test_new_moe_train", str(root)],
                   cwd=ROOT, env=subprocess_env(), check=True, capture_output=True, timeout=300)
    return root


@pytest.fixture(params=CASES)
def trained(request, built):
    data, root = built / "data" / "train", built / request.param
    run = check(run_train(
        root / "run", "--load", str(root / "mcore"), "--save", str(root / "run"),
        "--save-interval", "6", "--train-iters", "6", "--eval-interval", "1000",
        "--eval-iters", "0", "--expert-model-parallel-size", "2", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--data-path", str(data), "--lr", "3e-3",
        "--min-lr", "3e-3", "--lr-decay-style", "constant", "--log-interval", "1", "--seed",
        "1234", "--loss-type", "eaft", nproc=2))
    run_module("eaft_megatron", "convert", "megatron-to-hf", "--megatron", root / "run",
               "--out", root / "export", "--dtype", "fp32", check=True)
    return dict(root=root, run=run, data=data)


def _hf_cross_entropy(model_dir: Path, jsonl: Path) -> float:
    """transformers' mean CE over the supervised tokens of every conversation."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    total, count = 0.0, 0
    for line in jsonl.read_text().splitlines():
        row = json.loads(line)
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        target = labels[1:]
        keep = target != -100
        total += torch.nn.functional.cross_entropy(logits[keep], target[keep],
                                                   reduction="sum").item()
        count += int(keep.sum())
    return total / count


def test_trains_at_ep2_and_exports_to_transformers(trained):
    losses = [r["lm_loss"] for _, r in sorted(trained["run"].train().items())]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses
    root = trained["root"]
    jsonl = trained["data"].parent / "train.jsonl"
    before = _hf_cross_entropy(root / "hf", jsonl)
    after = _hf_cross_entropy(root / "export", jsonl)
    assert after < before - 0.5, (before, after)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
