"""``examples/sft/sft_single_node.sh`` on a machine without GPUs (gloo, fp32), as its comment
promises, with the restart idiom of ``common.sh``: the identical command run again resumes.
``examples/sft/README.md``'s commands as written: its evaluation (one process, no torchrun) run
on the script's checkpoint, its CPU smoke test's flags through the trainer's completion and
Megatron-LM's own argument validation (the launch itself is the script test's)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from tests.support.launch import ROOT, copy_tiny, subprocess_env

README = ROOT / "examples" / "sft" / "README.md"


def readme_commands() -> dict[str, list[str]]:
    """``{"evaluate": argv, "build": argv, "smoke": argv}`` as README.md writes them."""
    text = README.read_text()
    evaluate = re.search(r"Evaluate a checkpoint.*?`(python\s+-m\s+eaft_megatron\.train\s[^`]+)`",
                         text, re.S)[1]
    block = re.search(r"CPU smoke test[^`]*```bash\n(.*?)```", text, re.S)[1]
    lines = [shlex.split(x, comments=True) for x in block.replace("\\\n", " ").splitlines()]
    build, smoke = [x for x in lines if x]
    return {"evaluate": shlex.split(evaluate), "build": build, "smoke": smoke}


def test_single_node_script_runs_on_cpu_and_reruns(tmp_path, tiny_inputs):
    env = subprocess_env()
    copy_tiny(tiny_inputs, tmp_path)
    # torchrun of this interpreter first; no nvidia-smi on the PATH: the CPU path
    env.update(PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin", MODEL="qwen3-4b", TP="1",
               PP="1", SEQ="32", MBS="1", GBS="4", ITERS="2", CKPT=str(tmp_path / "mcore"),
               DATA=str(tmp_path / "data" / "train"), SAVE=str(tmp_path / "run"))
    cmd = ["bash", str(ROOT / "examples" / "sft" / "sft_single_node.sh"), "--save-interval", "1",
           "--eval-interval", "2", "--eval-iters", "1", "--num-workers", "0", "--log-interval", "1"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, (first.stdout + first.stderr)[-5000:]
    assert f"loading {tmp_path / 'mcore'} (weights only, from iteration 0)" in first.stdout
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2]
    assert records[0]["kind"] == "start" and records[0]["finetune"] is True
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (tmp_path / "run" / "eaft_megatron.lock").exists()  # released at the end
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert f"resuming from {tmp_path / 'run' / 'iter_0000002'}" in again.stdout
    assert "the run is complete; nothing to do" in again.stdout
    assert not (tmp_path / "run" / "eaft_megatron.lock").exists()

    # README's "Evaluate a checkpoint", as written: one process, no torchrun
    evaluate = readme_commands()["evaluate"]
    assert evaluate[0] == "python"
    variables = {"$SAVE": str(tmp_path / "run"), "$HELDOUT": str(tmp_path / "data" / "train")}
    evaluate = [sys.executable, *(variables.get(a, a) for a in evaluate[1:])]
    res = subprocess.run(evaluate, cwd=tmp_path, env=subprocess_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    assert f"loading {tmp_path / 'run'} (resuming at iteration 2)" in res.stdout
    assert re.search(r"validation loss at iteration 2 on validation set \| .*lm loss value",
                     res.stdout), res.stdout[-3000:]


def test_readme_smoke_test_passes_argument_validation(tmp_path, tiny_inputs, monkeypatch):
    """The smoke test's builder is the one the tests use; its trainer flags, completed as the
    trainer does, pass Megatron-LM's validation at its process count (they used to lack
    ``--save-interval``, which Megatron asserts when ``--save`` is given)."""
    from megatron.training.arguments import parse_args, validate_args

    from eaft_megatron.compat import cpu_compat
    from eaft_megatron.train.argv import complete_argv
    from eaft_megatron.train.main import add_train_args

    commands = readme_commands()
    assert commands["build"] == ["python", "-m", "tests.support.fixtures", "tiny"]
    smoke = commands["smoke"]
    assert smoke[:2] == ["torchrun", "--nproc-per-node"] and smoke[3:5] == ["-m",
                                                                          "eaft_megatron.train"]
    copy_tiny(tiny_inputs, tmp_path / "tiny")  # what the builder makes, where README puts it
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", smoke[2])
    monkeypatch.setenv("RANK", "0")

    def validate(argv: list[str]) -> None:
        full, _ = complete_argv(argv, cpu=True, te_available=False)
        monkeypatch.setattr(sys, "argv", ["eaft_megatron.train", *full])
        with cpu_compat():  # as the trainer runs on a machine without CUDA
            validate_args(parse_args(add_train_args))

    validate(smoke[5:])
    i = smoke.index("--save-interval")
    with pytest.raises(AssertionError) as failed:  # the check sees the mistake README had
        validate(smoke[5:i] + smoke[i + 2:])
    assert "args.save_interval is not None" in traceback.extract_tb(failed.tb)[-1].line
