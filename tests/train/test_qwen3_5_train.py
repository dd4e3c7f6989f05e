"""``python -m eaft_megatron.train`` on a gated-DeltaNet hybrid (Qwen3.5): Megatron's real loop,
torchrun, gloo, CPU, fp32, tensor parallelism 2, megatron-core's ``GatedDeltaNet`` on the CPU
layer's plain-PyTorch kernels.

    python -m pytest -q tests/train/test_qwen3_5_train.py

Inputs: the tiny random ``Qwen3_5ForCausalLM`` of ``tests/models/test_qwen3_5.py`` (3 DeltaNet
layers + 1 gated attention; vocabulary 300 like the training data) converted with
``convert hf-to-megatron``, and the 24 tokenized conversations of ``tests/support/fixtures.py``
(one per sample: packed data is refused for these models on CPU, tested without a launch).
Two launches at TP=2: an evaluation-only run of the converted model, whose loss equals
transformers' CE over the same 24 samples; 6 EAFT iterations whose losses fall, exported to
HF, reloaded by transformers, whose CE equals the run's final evaluation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launch import ROOT, check, run_train, subprocess_env, run_module

REL = 1e-4
COMMON = ("--tensor-model-parallel-size", "2", "--lr", "3e-3", "--min-lr", "3e-3",
          "--lr-decay-style", "constant", "--log-interval", "1", "--seed", "1234",
          "--loss-type", "eaft", "--micro-batch-size", "2", "--global-batch-size", "8",
          "--eval-iters", "3")  # 3 x 8 = the 24 stored samples, in stored order


def build(root: Path) -> None:
    from eaft_megatron.convert import hf_to_megatron
    from tests.models.test_qwen3_5 import build as build_qwen3_5
    from tests.support.fixtures import write_data

    build_qwen3_5("qwen3_5", root / "hf")
    hf_to_megatron(root / "hf", root / "mcore", dtype="fp32", progress=False)
    write_data(root / "data" / "train")
    write_data(root / "packed" / "train", pack=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_5_train")
    subprocess.run([sys.executable, "-m", "tests.train.test_qwen3_5_train", str(root)],
                   cwd=ROOT, env=subprocess_env(), check=True, capture_output=True, timeout=300)
    return dict(root=root, data=root / "data" / "train", packed=root / "packed" / "train")


def _reference(model_dir: Path, data: Path) -> dict:
    from tests.train.test_pretrain import _hf_reference

    return _hf_reference(model_dir, data)


def test_evaluation_equals_transformers(tiny):
    """The evaluation-only run also draws the landscape (``--eaft-landscape``, as the demo's
    before/after runs do): every supervised token once, its confident-conflict share equal to
    transformers' at the same thresholds."""
    from eaft_megatron.data.dataset import load_summary
    from tests.train.test_pretrain import _hf_reference

    land = tiny["root"] / "eval" / "landscape"
    run = check(run_train(tiny["root"] / "eval", "--load", str(tiny["root"] / "mcore"),
                          "--eval-only", "--data-path", str(tiny["data"]), *COMMON,
                          "--eaft-landscape", str(land), "--eaft-conflict-entropy", "0.9",
                          "--eaft-conflict-prob", "0.05", nproc=2))
    got = run.of("valid")[0]
    ref = _hf_reference(tiny["root"] / "hf", tiny["data"], conflict_entropy=0.9,
                        conflict_prob=0.05)
    assert got["lm_loss"] == pytest.approx(ref["ce"], rel=REL)
    assert got["gate_weight"] == pytest.approx(ref["weight"], rel=REL)
    landscape = json.loads((land / "landscape.json").read_text())
    tokens = load_summary(str(tiny["data"]))["supervised_tokens"]
    assert landscape["tokens"] == tokens
    assert 0 < ref["conflicts"] < 1
    assert landscape["confident_conflicts"] == pytest.approx(ref["conflicts"], abs=0.5 / tokens)
    assert landscape["confident_conflicts"] == pytest.approx(got["confident_conflicts"],
                                                             rel=1e-6, abs=1e-9)


def test_training_lowers_the_loss_and_exports(tiny):
    out = tiny["root"] / "train"
    run = check(run_train(out, "--load", str(tiny["root"] / "mcore"), "--save", str(out),
                          "--save-interval", "6", "--train-iters", "6", "--eval-interval", "6",
                          "--data-path", str(tiny["data"]), *COMMON, nproc=2))
    losses = [run.train()[i]["lm_loss"] for i in range(1, 7)]
    assert losses[-1] < losses[0], losses
    exported = tiny["root"] / "exported"
    run_module("eaft_megatron", "convert", "megatron-to-hf", "--megatron", out,
               "--out", exported, "--dtype", "fp32", check=True)
    final = run.of("valid")[-1]
    assert final["iteration"] == 6
    ref = _reference(exported, tiny["data"])
    assert final["lm_loss"] == pytest.approx(ref["ce"], rel=REL)
    assert ref["ce"] < _reference(tiny["root"] / "hf", tiny["data"])["ce"]


def test_refused_before_starting(tiny):
    """Packed data on CPU (the DeltaNet state would cross conversations) and a TP that does not
    divide the DeltaNet heads: one line each, before any launch."""
    from eaft_megatron.train.argv import TrainArgError, complete_argv

    common = ["--load", str(tiny["root"] / "mcore"), *COMMON, "--train-iters", "2"]
    odd = tiny["root"] / "odd_heads"  # 1 DeltaNet key head: TP=2 divides only the attention
    odd.mkdir(exist_ok=True)
    raw = json.loads((tiny["root"] / "hf" / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(dict(raw, linear_num_key_heads=1,
                                                     linear_num_value_heads=2)))
    with pytest.raises(TrainArgError, match=r"^--tensor-model-parallel-size 2 does not divide "
                       r"the model's gated-DeltaNet heads \(1 key, 2 value\)$"):
        complete_argv(["--hf-config", str(odd), *COMMON, "--train-iters", "2", "--data-path",
                       str(tiny["data"])], cpu=True, te_available=False)
    with pytest.raises(TrainArgError, match=r"is packed \(preprocess --pack\): "
                       r"Qwen3_5ForCausalLM's gated DeltaNet layers would carry their state"):
        complete_argv([*common, "--data-path", str(tiny["packed"])], cpu=True,
                      te_available=False)
    complete_argv([*common, "--data-path", str(tiny["data"])], cpu=True, te_available=False)
    # the TransformerEngine path passes THD cu_seqlens, which reset the state
    complete_argv([*common, "--data-path", str(tiny["packed"])], cpu=False, te_available=True)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
