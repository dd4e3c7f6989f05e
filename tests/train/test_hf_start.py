"""Training straight from a Hugging Face directory (``--load HF_DIR`` / ``--pretrained-checkpoint
HF_DIR``, ``eaft_megatron.train.hf_load``).

* parameters filled from the HF files at (TP, PP, EP) = (2,1,1), (1,2,1) (the tiny dense Qwen3,
  a tied Qwen2), (2,1,1) (the gated-DeltaNet hybrid Qwen3.5) and (1,1,2) (the tiny GLM-4.5 MoE)
  are bit-identical to ``convert hf-to-megatron`` at that TP/PP + ``load_model_weights``, every
  rank's whole state dict (one spawn of 2 gloo ranks);
* the trainer on 4 ranks: ``--eval-only --load HF_DIR`` of the GLM-4.5 MoE at TP=2 x PP=2 with
  its experts at EP=2: the parameters the trainer's model provider filled are bit-identical to
  conversion + load at that layout (``tests/train/hf_probe.py``, inside the launch) and the
  evaluation equals transformers' CE on the 24 samples;
  ``--load RUN --save RUN --pretrained-checkpoint HF_DIR`` at PP=2 trains, stores ``RUN/hf``,
  and ``megatron-to-hf RUN`` needs nothing else (transformers' CE of the export equals the run's
  last evaluation), and its ``--export-hf`` equals ``megatron-to-hf`` bit for bit; the GLM-4.5 MTP
  layer is kept aside in ``RUN/hf`` (two torchrun launches);
* bad input refused in one line before anything is built or written (the pre-flight, in
  process): missing / left-over / wrongly shaped tensors, a sharded checkpoint whose index
  names a missing file, pickle-only weights, truncated safetensors, unsupported architecture,
  a TP that does not divide the heads, a PP that does not divide the layers, an EP that does
  not divide the experts, ``--ckpt-step`` on a HF directory; and one real process: exit 2,
  one line, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.support.launch import check, copy_tiny, run_module, run_train, spawn

REL = 1e-5
COMMON = ("--data-path", None, "--micro-batch-size", "1", "--global-batch-size", "4",
          "--lr", "1e-3", "--min-lr", "1e-3", "--lr-decay-style", "constant",
          "--log-interval", "1", "--seed", "1234", "--loss-type", "sft")
EVAL_ALL = ("--eval-iters", "6")  # 6 x 4 = the 24 stored samples, in stored order


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_inputs):
    return copy_tiny(tiny_inputs, tmp_path_factory.mktemp("hf-start"))


def _common(tiny) -> list[str]:
    return [str(tiny["data"]) if a is None else a for a in COMMON]


# ---------------------------------------------------------------------------------------------
# Parameters: HF fill == conversion + load


def _states_worker(rank, world, cases):
    """For each (hf_dir, converted_dir, tp, pp, ep): this rank's state dict filled from the HF
    directory and loaded from the conversion; returns the names that differ (and counts)."""
    from megatron.core import parallel_state, tensor_parallel

    from eaft_megatron.checkpoint import find_iteration_dir, load_model_weights
    from eaft_megatron.compat import cpu_transformer_config_kwargs, install_cpu_compat
    from eaft_megatron.convert import load_hf_config
    from eaft_megatron.models import build_gpt_model, padded_vocab_size
    from eaft_megatron.train.hf_load import fill_from_hf

    install_cpu_compat()
    results = []
    for hf_dir, converted, tp, pp, ep in cases:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep)
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        config = load_hf_config(hf_dir)
        padded = padded_vocab_size(config.vocab_size, tp)
        models = []
        for _ in range(2):
            models.append(build_gpt_model(
                config, padded_vocab=padded, tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                transformer_impl="local", **cpu_transformer_config_kwargs()))
        copied = fill_from_hf(models[0], config, hf_dir, padded_vocab=padded)
        load_model_weights([models[1]], find_iteration_dir(converted))
        a, b = (dict(m.state_dict()) for m in models)
        keys = [k for k in a if not k.endswith("_extra_state")]
        differ = [k for k in keys if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        results.append(dict(layout=(tp, pp, ep), tensors=len(keys), copied=copied,
                            differ=differ, same_keys=set(a) == set(b)))
        parallel_state.destroy_model_parallel()
    return results


def test_hf_fill_equals_conversion_plus_load(tiny, tmp_path):
    """Dense Qwen3 at TP=2 and PP=2, a tied Qwen2 at PP=2 (the last stage's output layer is the
    embedding), the gated-DeltaNet hybrid Qwen3.5 at TP=2 (its ``in_proj`` / ``conv1d`` saved
    as named sections, each TP-sharded on its own), GLM-4.5 MoE at EP=2 (fp32 expert-bias
    buffer, shared expert, an MTP layer kept aside: the extra-tensors file equals the
    conversion's)."""
    from safetensors.torch import load_file

    from eaft_megatron.convert import hf_to_megatron, load_hf_config
    from eaft_megatron.train.hf_load import extra_tensors_writer
    from tests.support.tiny_models import build, build_demo_qwen3_5, build_moe

    moe, tied = tmp_path / "glm4_moe", tmp_path / "qwen2_tied"
    build_moe("glm4_moe", moe)
    build("qwen2_tied")[1].save_pretrained(tied)
    hybrid = build_demo_qwen3_5(tmp_path / "qwen3_5")
    cases = []
    for hf, tp, pp, ep in ((tiny["hf"], 2, 1, 1), (tiny["hf"], 1, 2, 1), (tied, 1, 2, 1),
                           (hybrid, 2, 1, 1), (moe, 1, 1, 2)):
        out = hf_to_megatron(hf, tmp_path / f"conv-{Path(hf).name}-{tp}{pp}{ep}", tp=tp, pp=pp,
                             progress=False)
        cases.append((str(hf), str(out), tp, pp, ep))
    per_rank = spawn(_states_worker, 2, cases)
    for rank, results in enumerate(per_rank):
        for r in results:
            assert r["same_keys"] and r["differ"] == [], (rank, r)
            assert r["copied"] >= r["tensors"] > 0, (rank, r)

    write = extra_tensors_writer(moe, load_hf_config(moe))
    (tmp_path / "side").mkdir()
    write(tmp_path / "side")
    mine = load_file(tmp_path / "side" / "extra_tensors.safetensors")
    theirs = load_file(Path(cases[-1][1]) / "hf" / "extra_tensors.safetensors")
    assert sorted(mine) == sorted(theirs) and mine and all(
        torch.equal(mine[k], theirs[k]) for k in mine)
    assert extra_tensors_writer(tiny["hf"], load_hf_config(tiny["hf"])) is None


# ---------------------------------------------------------------------------------------------
# The trainer


def test_eval_only_from_hf_dir_tp2_pp2_ep2_probed(tiny, tmp_path):
    """GLM-4.5 MoE (a dense first layer, shared expert, sigmoid router with its fp32 expert
    bias, an MTP layer kept aside) evaluated straight from its HF directory at TP=2 x PP=2 on 4
    ranks, the experts at EP=2 (expert TP 1): every rank's parameters, as the trainer's model
    provider filled them, are bit-identical to ``convert hf-to-megatron`` + megatron-core's
    sharded load at the same layout (``tests/train/hf_probe.py``, inside this one launch), and
    the evaluation equals transformers' CE on the 24 samples."""

    from eaft_megatron.convert import hf_to_megatron
    from tests.support.launch import Run
    from tests.support.tiny_models import build_moe
    from tests.train.test_pretrain import _hf_reference

    moe = tmp_path / "glm4_moe"
    build_moe("glm4_moe", moe)
    converted = hf_to_megatron(moe, tmp_path / "converted", tp=2, pp=2, progress=False)
    out, probe = tmp_path / "eval", tmp_path / "probe"
    proc = run_module("tests.train.hf_probe", "--log-dir", out, "--num-workers", "0",
                      "--load", moe, "--eval-only", *EVAL_ALL,
                      "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                      "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
                      *_common(tiny), nproc=4, timeout=400,
                      env=dict(EAFT_PROBE_CONVERTED=str(converted), EAFT_PROBE_OUT=str(probe)))
    metrics = out / "metrics.jsonl"
    run = check(Run(proc.returncode, proc.stdout + proc.stderr,
                    [json.loads(x) for x in metrics.read_text().splitlines()]
                    if metrics.is_file() else []))
    assert "loading the Hugging Face model" in run.output
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(4)]
    for rank, r in enumerate(ranks):
        assert r["from_hf"] == str(moe) and r["differ"] == [] and r["extra"] == [], (rank, r)
    # each stage holds its own layers, the TP peers the same entries; experts split over EP
    assert ranks[0]["keys"] == ranks[1]["keys"] and ranks[2]["keys"] == ranks[3]["keys"]
    assert any(k.startswith("embedding.") for k in ranks[0]["keys"])
    assert any(k.startswith("output_layer.") for k in ranks[2]["keys"])
    assert any("experts" in k for k in ranks[0]["keys"] + ranks[2]["keys"])
    start, record = run.records
    assert start["kind"] == "start" and start["checkpoint"] == str(moe)
    assert record["kind"] == "valid" and record["iteration"] == 0
    assert record["lm_loss"] == pytest.approx(_hf_reference(moe, tiny["data"])["ce"], rel=REL)


def test_train_from_hf_dir_then_export(tiny, capsys):
    """... and ``--export-hf DIR`` (an earlier export of this run there, replaced) on an early
    exit (``--exit-interval``: Megatron saves, then ``sys.exit``, like ``--exit-signal-handler``)
    writes, with the node's 2 ranks' worth of converter processes, what ``megatron-to-hf`` of
    the last checkpoint writes, bit for bit; transformers' CE
    of it equals the run's last evaluation; the pre-flight of ``--export-hf`` (in process)."""
    from eaft_megatron.convert import megatron_to_hf
    from eaft_megatron.train.argv import TrainArgError, complete_argv
    from eaft_megatron.train.export import RECORD, export_final
    from tests.train.test_pretrain import _hf_reference

    out, export = tiny["root"] / "run-hf-pp2", tiny["root"] / "run-hf-pp2-hf"
    export.mkdir()  # an earlier (here: unfinished) export of this run: replaced
    (export / "config.json").write_text("{}")
    out.mkdir()
    (out / RECORD).write_text(json.dumps({"exports": {str(export.resolve()): None}}))
    run = check(run_train(out, "--load", str(out), "--save", str(out), "--pretrained-checkpoint",
                          str(tiny["hf"]), "--train-iters", "4", "--exit-interval", "2",
                          "--save-interval", "2", "--eval-interval", "2", *EVAL_ALL,
                          "--pipeline-model-parallel-size", "2", "--export-hf", str(export),
                          *_common(tiny), nproc=2))
    assert "loading the Hugging Face model" in run.output
    assert f"exporting iteration 2 to {export} (Hugging Face, 2 processes)" in run.output
    assert sorted(run.train()) == [1, 2]
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert json.loads((out / "hf" / "config.json").read_text())["architectures"] == [
        "Qwen3ForCausalLM"]
    assert json.loads((out / RECORD).read_text()) == {"exports": {str(export.resolve()): 2}}
    reference = megatron_to_hf(out, tiny["root"] / "run-hf-pp2-export", progress=False)
    files = sorted(p.name for p in reference.iterdir())
    shards = [n for n in files if n.endswith(".safetensors")]
    assert sorted(p.name for p in export.iterdir()) == files and shards
    for name in files:
        assert (export / name).read_bytes() == (reference / name).read_bytes(), name
    ref = _hf_reference(export, tiny["data"])  # transformers loads it
    assert run.of("valid")[-1]["lm_loss"] == pytest.approx(ref["ce"], rel=REL)
    # a rerun of the finished run: the export of iteration 2 is there, nothing rewritten
    inode = (export / shards[0]).stat().st_ino
    capsys.readouterr()
    assert export_final(str(out), str(export)) == 0
    assert "already holds iteration 2; nothing to export" in capsys.readouterr().out
    assert (export / shards[0]).stat().st_ino == inode

    # the pre-flight: the earlier export is accepted; anything else is refused in one line
    base = ["--load", str(out), "--save", str(out), *_common(tiny)]
    complete_argv([*base, "--export-hf", str(export)], cpu=True, te_available=False)
    foreign = tiny["root"] / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [(foreign, "is not empty and is not an earlier export of this run"),
             (out / "hf-export", f"overlaps --save {out}"),
             (tiny["hf"], "overlaps --pretrained-checkpoint")]
    for target, message in cases:
        argv = [*base, "--pretrained-checkpoint", str(tiny["hf"]), "--export-hf", str(target)]
        with pytest.raises(TrainArgError) as e:
            complete_argv(argv, cpu=True, te_available=False)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(TrainArgError, match="--export-hf-nproc 0: give a number"):
        complete_argv([*base, "--export-hf", str(export), "--export-hf-nproc", "0"], cpu=True,
                      te_available=False)
    with pytest.raises(TrainArgError, match="needs --save"):
        complete_argv([*base, "--eval-only", "--export-hf", str(foreign / "x")], cpu=True,
                      te_available=False)
    assert (foreign / "notes.txt").read_text() == "mine" and not (out / "hf-export").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: one line before anything is built or written


def _rewrite(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_restart_resolution_with_a_hf_dir(tiny, tmp_path):
    """A complete checkpoint in --save is resumed; else the HF directory is the start (either
    flag); Megatron gets no --load then; RUN/hf is found on the rerun."""
    from eaft_megatron.train.argv import complete_argv, flag_value
    from eaft_megatron.train.restart import resolve_start
    from tests.train.test_restart import _fake_checkpoint

    hf, run = str(tiny["hf"]), tmp_path / "run"
    base = dict(save=str(run), finetune=False, ckpt_step=None, training=True)
    for kw in (dict(load=hf, pretrained=None), dict(load=str(run), pretrained=hf)):
        s = resolve_start(**base, **kw)
        assert (s.load, s.hf, s.resumed, s.iteration) == (None, hf, False, 0), kw
    argv, info = complete_argv(["--load", str(run), "--save", str(run),
                                "--pretrained-checkpoint", hf, *_common(tiny)], cpu=True,
                               te_available=False)
    assert flag_value(argv, "--load") is None and "--finetune" not in argv
    assert info.hf_dir == Path(hf) and info.start.hf == hf
    _fake_checkpoint(run, [4], 4)
    s = resolve_start(**base, load=str(run), pretrained=hf)
    assert (s.load, s.hf, s.resumed, s.iteration) == (str(run), None, True, 4)


def _tensor_names(hf: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def test_bad_hf_directories_refused_in_one_line(tiny, tmp_path):
    from eaft_megatron.train.argv import TrainArgError, complete_argv

    hf = tiny["hf"]
    missing = _rewrite(hf, tmp_path / "missing", lambda t: t.pop("model.norm.weight"))
    shaped = _rewrite(hf, tmp_path / "shaped", lambda t: t.update(
        {"model.norm.weight": torch.ones(65)}))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    truncated = tmp_path / "truncated"
    shutil.copytree(hf, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
    llama = tmp_path / "llama"
    shutil.copytree(hf, llama)
    raw = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**raw, "architectures": ["LlamaForCausalLM"]}))
    extra = _rewrite(hf, tmp_path / "extra", lambda t: t.update(
        {"model.layers.0.mlp.extra_proj.weight": torch.ones(2, 2)}))
    lost_shard = tmp_path / "lost_shard"  # the index names a shard that is not there
    shutil.copytree(hf, lost_shard)
    names = _tensor_names(hf)
    (lost_shard / "model.safetensors").rename(lost_shard / "model-00001-of-00002.safetensors")
    (lost_shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}}))
    from tests.support.tiny_models import build_moe

    moe = tmp_path / "moe"
    build_moe("qwen3_moe", moe)

    save = tmp_path / "save"
    cases = [
        ((missing,), "lacks 1 tensor(s) the Qwen3ForCausalLM mapping needs: ['model.norm.weight']"),
        ((extra,), "holds 1 tensor(s) the Qwen3ForCausalLM mapping does not consume (wrong "
                   "architecture?): ['model.layers.0.mlp.extra_proj.weight']"),
        ((lost_shard,), "lists model-00002-of-00002.safetensors, which is missing"),
        ((hf, "--pipeline-model-parallel-size", "3"), "does not divide the model's 2 layers"),
        ((moe, "--expert-model-parallel-size", "3"), "does not divide the 8"),
        ((shaped,), "'model.norm.weight' has shape (65,), expected (64,)"),
        ((pickled,), "only PyTorch .bin weights"),
        ((truncated,), "is truncated"),
        ((llama,), "unsupported architecture 'LlamaForCausalLM'"),
        ((hf, "--tensor-model-parallel-size", "3"), "does not divide the model's 4 attention"),
        ((hf, "--ckpt-step", "5"), "is a Hugging Face model directory, which has no iterations"),
    ]
    for (source, *extra), message in cases:
        for flag in ("--load", "--pretrained-checkpoint"):
            argv = [flag, str(source), "--save", str(save), *extra, *_common(tiny)]
            with pytest.raises(TrainArgError) as e:
                complete_argv(argv, cpu=True, te_available=False)
            assert message in str(e.value) and "\n" not in str(e.value), (source, str(e.value))
    assert not save.exists()
    # and through the command: exit 2, one line, nothing written
    proc = run_module("eaft_megatron.train", "--load", pickled, "--save", save, *_common(tiny))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    assert len(lines) == 1 and "only PyTorch .bin weights" in lines[0], proc.stderr[-3000:]
    assert not save.exists()
