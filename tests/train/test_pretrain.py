"""``python -m eaft_megatron.train`` end to end: Megatron's real loop, torchrun, gloo, CPU, fp32.

    python -m pytest -q tests/train/test_pretrain.py

Inputs (``tests/support/fixtures.py``): a random 2-layer, hidden-64 Qwen3 saved by ``transformers``,
converted with ``eaft-megatron convert hf-to-megatron``, and 24 tokenized conversations prepared
with ``eaft_megatron.data``. Every run starts from the converted weights (``--finetune``), so all
parallel layouts start from the same model (pipeline stages are seeded differently). Every
evaluation covers exactly the 24 stored samples (6 x global batch 4, validation unshuffled).
Proofs:
  * (tp, pp, dp) = (2,1,1), (1,2,1), (1,1,2) log the same 3 training losses as (1,1,1)
    (rel 1e-5), with EAFT on;
  * 6 iterations straight == 3 + save + resume from that checkpoint + 3 (losses, evaluation);
  * evaluation only of the converted model == the plain CE transformers computes on the same
    samples (rel 1e-5); its gate weight, entropy and confident-conflict share == a direct
    computation from transformers' logits;
  * EAFT training lowers the evaluation loss; logged gate statistics lie in [0, 1];
  * the trainer's checkpoint converts back to HF (``megatron-to-hf``), and transformers' CE of
    the result == the trainer's last evaluation.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from tests.support.launch import check, copy_tiny, run_train, run_module

REL = 1e-5
TOP_K = 20
COMMON = ("--data-path", None, "--micro-batch-size", "1", "--global-batch-size", "4",
          "--lr", "1e-3", "--min-lr", "1e-3", "--lr-decay-style", "constant",
          "--log-interval", "1", "--seed", "1234", "--loss-type", "eaft")
EVAL_ALL = ("--eval-iters", "6")  # 6 x 4 = the 24 stored samples, in stored order


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_inputs):
    return copy_tiny(tiny_inputs, tmp_path_factory.mktemp("train"))


def _common(tiny) -> list[str]:
    return [str(tiny["data"]) if a is None else a for a in COMMON]


@pytest.fixture(scope="module")
def straight(tiny):
    """(1,1,1), 6 iterations from the converted model, checkpoint + evaluation every 3, a
    landscape at the evaluations of iterations divisible by 6 (and the final one)."""
    out = tiny["root"] / "straight"
    return check(run_train(out, "--load", str(tiny["ckpt"]), "--save", str(out),
                           "--save-interval", "3", "--train-iters", "6", "--eval-interval", "3",
                           "--eaft-landscape", str(out / "landscape"),
                           "--eaft-landscape-interval", "6", *EVAL_ALL, *_common(tiny)))


@pytest.fixture(scope="module")
def evaluated(tiny):
    """Evaluation only of the converted model, with thresholds that make conflicts occur."""
    out = tiny["root"] / "eval"
    return check(run_train(out, "--load", str(tiny["ckpt"]), "--eval-only", *EVAL_ALL,
                           "--eaft-conflict-entropy", "0.9", "--eaft-conflict-prob", "0.05",
                           *_common(tiny)))


def _hf_reference(model_dir, data_prefix, *, conflict_entropy=0.9, conflict_prob=0.05):
    """transformers' plain CE and the gate statistics over the 24 samples, token-weighted."""
    import transformers

    from eaft_megatron.data import SFTIndexedDataset

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ds = SFTIndexedDataset(str(data_prefix), shuffle=False)
    sums = dict(ce=0.0, weight=0.0, entropy=0.0, conflicts=0.0)
    count = 0
    for i in range(len(ds)):
        sample = ds[i]
        with torch.no_grad():
            logits = model(sample["tokens"][None]).logits[0].double()  # [S, V]
        labels = sample["labels"]
        keep = labels != -100
        logits, labels = logits[keep], labels[keep]
        logp = torch.log_softmax(logits, -1)
        ce = -logp.gather(-1, labels[:, None])[:, 0]
        q = torch.softmax(torch.topk(logits, TOP_K, -1).values, -1)
        entropy = -(q * q.log()).sum(-1)
        weight = (entropy / math.log(TOP_K)).clamp(max=1)
        conflicts = (weight < conflict_entropy) & (ce.neg().exp() < conflict_prob)
        sums["ce"] += ce.sum().item()
        sums["weight"] += weight.sum().item()
        sums["entropy"] += entropy.sum().item()
        sums["conflicts"] += conflicts.sum().item()
        count += int(keep.sum())
    return {k: v / count for k, v in sums.items()}


@pytest.mark.parametrize("layout", [("--tensor-model-parallel-size", "2"),
                                    ("--pipeline-model-parallel-size", "2"),
                                    ()], ids=["tp2", "pp2", "dp2"])
def test_parallel_layouts_give_the_same_losses(tiny, straight, layout):
    out = tiny["root"] / f"layout-{'-'.join(layout) or 'dp2'}"
    run = check(run_train(out, "--load", str(tiny["ckpt"]), "--train-iters", "3",
                          "--eval-interval", "1000", "--eval-iters", "0", *layout,
                          *_common(tiny), nproc=2))
    reference, got = straight.train(), run.train()
    assert sorted(got) == [1, 2, 3]
    for it in (1, 2, 3):
        for key in ("loss", "lm_loss", "gate_weight", "entropy"):
            assert got[it][key] == pytest.approx(reference[it][key], rel=REL), (it, key)


def test_resume_equals_straight(tiny, straight):
    out = tiny["root"] / "resumed"
    run = check(run_train(out, "--load", str(tiny["root"] / "straight"), "--ckpt-step", "3",
                          "--save", str(out), "--save-interval", "3", "--train-iters", "6",
                          "--eval-interval", "3", *EVAL_ALL, *_common(tiny)))
    reference, got = straight.train(), run.train()
    assert sorted(got) == [4, 5, 6]  # the iteration, data position and schedule came back
    for it in (4, 5, 6):
        assert got[it]["consumed_samples"] == reference[it]["consumed_samples"]
        for key in ("loss", "lm_loss", "gate_weight", "grad_norm", "learning_rate"):
            assert got[it][key] == pytest.approx(reference[it][key], rel=REL), (it, key)
    assert run.of("valid")[0]["lm_loss"] == pytest.approx(straight.of("valid")[1]["lm_loss"],
                                                          rel=REL)
    assert (out / "hf" / "config.json").is_file()  # the HF config travels with the checkpoints


def test_eval_only_matches_transformers(tiny, evaluated):
    start, record = evaluated.records
    assert start["kind"] == "start" and start["checkpoint"] == str(tiny["ckpt"])
    assert record["kind"] == "valid" and record["iteration"] == 0 and record["final"]
    ref = _hf_reference(tiny["hf"], tiny["data"])
    assert record["lm_loss"] == pytest.approx(ref["ce"], rel=REL)
    assert record["gate_weight"] == pytest.approx(ref["weight"], rel=REL)
    assert record["entropy"] == pytest.approx(ref["entropy"], rel=REL)
    # the validation line: a perplexity for the plain cross-entropy only, not for the EAFT
    # objective, the gate weight, the entropy or the share of conflicts
    i, line = next((i, x) for i, x in enumerate(evaluated.output.splitlines())
                   if "validation loss at" in x)
    assert re.findall(r"\| ([^|]+?) PPL: ", line) == ["lm loss"], line
    assert "gate weight value: " in line and "entropy value: " in line, line
    ppl = float(re.search(r"lm loss PPL: (\S+) ", line)[1])
    assert ppl == pytest.approx(math.exp(record["lm_loss"]), rel=1e-5)
    assert evaluated.output.splitlines()[i - 1] == "-" * (len(line) + 1)
    assert record["confident_conflicts"] == pytest.approx(ref["conflicts"], abs=1e-6)
    assert 0 < record["confident_conflicts"] < 1  # the thresholds make the check meaningful
    assert record["loss"] < record["lm_loss"]  # eaft weights are < 1


def test_eaft_training_lowers_the_loss(straight, evaluated):
    before = evaluated.of("valid")[0]
    valid = straight.of("valid")
    assert [r["iteration"] for r in valid] == [3, 6, 6]  # every 3, then the final one
    assert [r["final"] for r in valid] == [False, False, True]
    assert valid[1]["lm_loss"] == pytest.approx(valid[2]["lm_loss"], rel=REL)  # same samples
    assert valid[1]["loss"] < valid[0]["loss"] < before["loss"]
    assert valid[1]["lm_loss"] < valid[0]["lm_loss"] < before["lm_loss"]
    for r in straight.of("train") + straight.of("valid"):
        assert 0 <= r["gate_weight"] <= 1 and 0 <= r["confident_conflicts"] <= 1
        assert 0 <= r["entropy"] <= math.log(TOP_K) + 1e-6
        assert r["loss"] <= r["lm_loss"] + 1e-6


def test_trainer_checkpoint_converts_back_to_hf(tiny, straight):
    out = tiny["root"] / "hf_trained"
    run_module("eaft_megatron", "convert", "megatron-to-hf", "--megatron",
               tiny["root"] / "straight", "--out", out, "--dtype", "fp32", check=True)
    ref = _hf_reference(out, tiny["data"])
    assert straight.of("valid")[-1]["lm_loss"] == pytest.approx(ref["ce"], rel=REL)


def test_fused_linear_flag_gives_the_same_losses(tiny, straight):
    """--eaft-fused-linear (output layer + loss fused through Megatron's output_processor hook)
    logs the same 3 training losses as the unfused path, at tp=2."""
    out = tiny["root"] / "fused-tp2"
    run = check(run_train(out, "--load", str(tiny["ckpt"]), "--train-iters", "3",
                          "--eval-interval", "1000", "--eval-iters", "0",
                          "--tensor-model-parallel-size", "2", "--eaft-fused-linear",
                          *_common(tiny), nproc=2))
    reference, got = straight.train(), run.train()
    assert sorted(got) == [1, 2, 3]
    for it in (1, 2, 3):
        for key in ("loss", "lm_loss", "gate_weight", "entropy"):
            assert got[it][key] == pytest.approx(reference[it][key], rel=REL), (it, key)


def test_landscape_interval_during_training(tiny, straight):
    """--eaft-landscape-interval 6 with evaluations at 3 and 6 (+ the final one at 6): a landscape
    of iteration 6 only, counting every supervised validation token once, its conflict share
    equal to metrics.jsonl's for the same evaluation."""
    import json

    root = tiny["root"] / "straight" / "landscape"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["iter_0000006"]
    record = json.loads((root / "iter_0000006" / "landscape.json").read_text())
    assert record == json.loads((root / "landscape.json").read_text())  # the latest
    assert record["iteration"] == 6 and record["final"]
    from eaft_megatron.data import SFTIndexedDataset

    ds = SFTIndexedDataset(str(tiny["data"]), shuffle=False)
    assert record["tokens"] == sum(int(ds[i]["loss_mask"].sum()) for i in range(len(ds)))
    valid = straight.of("valid")[-1]
    assert valid["confident_conflicts"] == pytest.approx(record["confident_conflicts"],
                                                         rel=1e-6, abs=1e-9)
    assert "landscape @ 3" not in straight.output and "landscape @ 6" in straight.output
