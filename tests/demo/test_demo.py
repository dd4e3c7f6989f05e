"""``eaft-megatron demo --quick``: every stage of the pipeline produces what the next needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support.launch import run_module


def test_demo_quick_runs_every_stage(tmp_path):
    work = tmp_path / "demo"
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-m", "eaft_megatron", "demo", "--quick",
                           "--workdir", str(work)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for step in range(1, 7):
        assert f"[{step}/6]" in proc.stdout

    # 1-2: HF model with tokenizer, converted checkpoint
    assert (work / "hf_model" / "config.json").is_file()
    assert (work / "hf_model" / "tokenizer.json").is_file()
    assert (work / "mcore" / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert (work / "mcore" / "iter_0000000" / ".metadata").is_file()
    # 3: prepared data and its summary
    summary = json.loads(next((work / "data").glob("train*.json")).read_text())
    assert summary["documents"] > 50 and 0 < summary["supervised_tokens"] < summary["tokens"]
    bins = list((work / "data").glob("train*.bin"))
    assert bins and all(b.stat().st_size > 0 for b in bins)
    # 4: training through Megatron's loop: loss goes down, gate statistics are sane
    records = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) >= 2 and train[-1]["loss"] < train[0]["loss"]
    assert all(0 <= r["gate_weight"] <= 1 for r in train)
    assert (work / "run" / "latest_checkpointed_iteration.txt").read_text() == "8"
    assert records[0]["kind"] == "start" and records[0]["checkpoint"] == str(work / "mcore")
    # validation on held-out conversations: its own prepared prefix, no prompt shared with
    # the training data, periodic and final evaluations told apart, narrated from metrics.jsonl
    assert "--valid-data-path " + str(work / "data" / "valid") in proc.stdout

    def prompts(name):
        lines = (work / "data" / "jsonl" / f"{name}.jsonl").read_text().splitlines()
        return [json.dumps([m for m in json.loads(x)["messages"] if m["role"] != "assistant"])
                for x in lines if x.strip()]

    valid_prompts, train_prompts = prompts("valid"), prompts("train")
    assert valid_prompts and not set(valid_prompts) & set(train_prompts)
    valid_summary = json.loads((work / "data" / "valid_summary.json").read_text())
    assert valid_summary["documents"] == len(valid_prompts)
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["final"] for r in valid][-1] is True and not any(r["final"] for r in valid[:-1])
    assert f"final validation @ 8 (held-out) | lm loss {valid[-1]['lm_loss']:.4g}" in proc.stdout
    assert (work / "run" / "curves.png").stat().st_size > 10_000
    # the landscape of the same held-out samples before and after training (evaluation-only
    # runs), each equal to its run's confident-conflict figure in metrics.jsonl
    before, after = (json.loads((work / "landscape" / n / "landscape.json").read_text())
                     for n in ("before", "after"))
    assert 0 < before["tokens"] == after["tokens"] <= valid_summary["supervised_tokens"]
    assert before["iteration"] == 0 and after["iteration"] == 8 and after["final"]
    evals = [json.loads(x) for x in (work / "landscape" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "valid"]
    for record, metrics in zip((before, after), evals):
        assert record["confident_conflicts"] == pytest.approx(metrics["confident_conflicts"],
                                                              rel=1e-6, abs=1e-9)
    assert "confident conflicts on the held-out data: " in proc.stdout
    assert (work / "landscape" / "comparison.png").stat().st_size > 10_000
    assert (work / "landscape" / "after" / "samples.jsonl").stat().st_size > 0
    assert any((work / "run" / "tensorboard").iterdir())
    # 5-6: HF export loads in transformers and matches the Megatron model
    result = json.loads((work / "demo_result.json").read_text())
    assert result["check"]["max_logit_diff"] < 1e-4
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(work / "hf_sft", dtype=torch.float32)
    assert model.config.architectures == ["Qwen3ForCausalLM"]
    assert isinstance(result["check"]["reply"], str)


def test_demo_quick_moe_with_expert_parallelism(tmp_path, capsys):
    """``demo --hf-model <Qwen3-MoE> --tp 1 --ep 2``: no conversion, two ranks each reading
    and holding half the experts train it; the export's logits equal the Megatron model's
    (transformers' MoE forward).
    (``--no-landscape``: the evaluation-only runs are the dense test's.)"""
    from tests.support.tiny_models import build_demo_moe

    hf = build_demo_moe(tmp_path / "moe")
    work = tmp_path / "demo"
    proc = run_module("eaft_megatron", "demo", "--quick", "--hf-model", hf, "--tp", "1",
                      "--ep", "2", "--no-landscape", "--workdir", work, timeout=900,
                      env=dict(TQDM_DISABLE="1"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "(Qwen3MoeForCausalLM)" in proc.stdout and "TP=1 x PP=1 x EP=2" in proc.stdout
    assert "--expert-model-parallel-size 2" in proc.stdout
    # no conversion step: the trainer starts from the HF directory itself
    assert "No conversion: the trainer reads" in proc.stdout and not (work / "mcore").exists()
    assert f"--pretrained-checkpoint {hf} " in proc.stdout
    records = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "start" and records[0]["checkpoint"] == str(hf)
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) >= 2 and train[-1]["loss"] < train[0]["loss"]
    assert all(r["expert_load_imbalance"] >= 1 for r in train)
    assert "expert load max/mean" in proc.stdout
    result = json.loads((work / "demo_result.json").read_text())
    assert result["check"]["max_logit_diff"] < 1e-4
    import transformers

    exported = transformers.AutoModelForCausalLM.from_pretrained(work / "hf_sft",
                                                                 dtype=torch.float32)
    assert exported.config.architectures == ["Qwen3MoeForCausalLM"]
    assert exported.config.num_experts == 8

    assert not (work / "landscape").exists()

    # the layout is checked against the model before any work: one line naming the problem,
    # exit 2, no --workdir left behind
    from eaft_megatron.cli import main

    for flags, message in ((["--ep", "3"], "expert parallel size 3 does not divide the 8"),
                           (["--ep", "2", "--nproc", "3"], "--nproc 3 is not a multiple of")):
        bad = tmp_path / "bad"
        assert main(["demo", "--quick", "--hf-model", str(hf), "--tp", "1", *flags,
                     "--workdir", str(bad)]) == 2
        assert message in capsys.readouterr().err and not bad.exists()


def test_demo_mistakes_exit_2_and_its_own_output_is_replaced(tmp_path, capsys):
    """``demo --tp 3`` (4 heads): one line, exit 2, no --workdir (a real process); a folder
    the demo made (its marker) is replaced by the next demo, another non-empty one refused."""
    work = tmp_path / "demo"
    proc = run_module("eaft_megatron", "demo", "--quick", "--tp", "3", "--workdir", work,
                      env=dict(TQDM_DISABLE="1"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "eaft-megatron demo: error: the demo's Qwen3 model: "), proc.stderr
    assert "Traceback" not in proc.stderr and not work.exists()

    from eaft_megatron.demo.pipeline import MARKER, DemoError, _take_workdir

    _take_workdir(work, force=False)
    (work / "run").mkdir()
    _take_workdir(work, force=False)  # an earlier demo's output: replaced
    assert sorted(p.name for p in work.iterdir()) == [MARKER]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(DemoError, match="is not empty and not an earlier demo's output"):
        _take_workdir(other, force=False)
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]


def test_demo_quick_gated_deltanet_hybrid(tmp_path):
    """``demo --hf-model <Qwen3.5> --tp 2``: a gated-DeltaNet hybrid (one DeltaNet layer, one
    gated attention layer) trains on CPU from the demo's unpacked data (one conversation per
    sample: the trainer refuses packed data for these models on the local spec, see
    tests/train/test_qwen3_5_train.py); the export's logits equal the Megatron model's.
    (``--no-landscape``: the evaluation-only landscape of a hybrid is test_qwen3_5_train's.)"""
    from tests.support.tiny_models import build_demo_qwen3_5

    hf = build_demo_qwen3_5(tmp_path / "qwen3_5")
    work = tmp_path / "demo"
    proc = run_module("eaft_megatron", "demo", "--quick", "--hf-model", hf, "--tp", "2",
                      "--no-landscape", "--workdir", work, timeout=900,
                      env=dict(TQDM_DISABLE="1"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "(Qwen3_5ForCausalLM)" in proc.stdout and "TP=2 x PP=1" in proc.stdout
    assert "falling back to its reference PyTorch" not in proc.stdout + proc.stderr
    assert "No conversion: the trainer reads" in proc.stdout and not (work / "mcore").exists()
    for name in ("train", "valid"):
        summary = json.loads((work / "data" / f"{name}_summary.json").read_text())
        assert summary["packed"] is False and summary["sequences"] == summary["documents"]
    records = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) >= 2 and train[-1]["loss"] < train[0]["loss"]
    result = json.loads((work / "demo_result.json").read_text())
    assert result["check"]["max_logit_diff"] < 1e-4
    import transformers

    exported = transformers.AutoModelForCausalLM.from_pretrained(work / "hf_sft",
                                                                 dtype=torch.float32)
    assert exported.config.architectures == ["Qwen3_5ForCausalLM"]
    assert exported.config.layer_types == ["linear_attention", "full_attention"]


def test_demo_launches_its_trainer_with_eaft_torchrun(tmp_path, monkeypatch, capsys):
    """``$EAFT_TORCHRUN`` (a site's wrapper) replaces ``python -m torch.distributed.run`` before
    the same torchrun arguments; a value that does not split is a mistake: one line, exit 2,
    nothing written."""
    import argparse

    from eaft_megatron.cli import main
    from eaft_megatron.demo.pipeline import QUICK, _trainer_command

    args = argparse.Namespace(tp=2, pp=1, ep=1, nproc=None, loss_type="eaft")
    monkeypatch.delenv("EAFT_TORCHRUN", raising=False)
    plain = _trainer_command(args, QUICK, "--eval-only")
    assert plain[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    monkeypatch.setenv("EAFT_TORCHRUN", "/site/launch --tag 'a b'")
    wrapped = _trainer_command(args, QUICK, "--eval-only")
    assert wrapped[:3] == ["/site/launch", "--tag", "a b"]
    # the same torchrun arguments (the master port aside: a free one each time)
    assert wrapped[3:8] == plain[3:8] and wrapped[9:] == plain[9:]
    assert wrapped[9:12] == ["-m", "eaft_megatron.train", "--eval-only"]

    monkeypatch.setenv("EAFT_TORCHRUN", 'launch "a')
    work = tmp_path / "demo"
    assert main(["demo", "--quick", "--workdir", str(work)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("eaft-megatron demo: error: EAFT_TORCHRUN='launch \"a': "
                           "No closing quotation") and not work.exists()
