"""``examples/sft/sft_single_node.sh`` on a machine without GPUs (gloo, fp32), as its comment
promises, with the restart idiom of ``common.sh``: the identical command run again resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.launch import ROOT, copy_tiny, subprocess_env


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
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert f"resuming from {tmp_path / 'run' / 'iter_0000002'}" in again.stdout
    assert "the run is complete; nothing to do" in again.stdout
