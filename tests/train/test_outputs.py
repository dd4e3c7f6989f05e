"""Output paths of the trainer checked before any work (``eaft_megatron.train.outputs``), and a
pre-flight refusal under torchrun: one line from the worker, every worker exits 2, torchrun
(which exits 1 whenever a worker fails; measured, torch 2.14) names that line as the root cause
instead of "To enable traceback see ...", and no worker traceback."""

from __future__ import annotations

import os
import subprocess

import pytest

from eaft_megatron.train.flags import TrainArgError
from eaft_megatron.train.outputs import check_output_paths
from tests.support.launch import ROOT, subprocess_env, torchrun


def test_each_output_flag_is_checked(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    for flag in ("--save", "--log-dir", "--tensorboard-dir", "--eaft-landscape"):
        with pytest.raises(TrainArgError, match=f"^{flag} {file} is a regular file, not a "
                                                f"directory"):
            check_output_paths(["--train-iters", "1", flag, str(file)])
        below = file / "a" / "b"
        with pytest.raises(TrainArgError, match=f"^{flag} {below} lies below {file}, a "
                                                f"regular file"):
            check_output_paths([f"{flag}={below}"])
    check_output_paths(["--save", str(tmp_path / "new" / "run"), "--log-dir", str(tmp_path),
                        "--eaft-landscape", str(tmp_path / "landscape")])  # fine: made later
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(TrainArgError, match="no write permission"):
            check_output_paths(["--tensorboard-dir", str(ro / "tb")])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["file"] + (["ro"] if os.geteuid() != 0 else []))  # nothing created


def test_a_refusal_under_torchrun_is_one_line_and_named_in_its_report(tmp_path):
    landscape = tmp_path / "landscape.png"
    landscape.write_text("not a directory")
    cmd = torchrun("-m", "eaft_megatron.train", "--save", str(tmp_path / "run"),
                   "--eaft-landscape", str(landscape), "--train-iters", "1", nproc=2)
    res = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    out = res.stdout + res.stderr
    line = (f"eaft_megatron.train: error: --eaft-landscape {landscape} is a regular file, not a "
            f"directory: give a directory (or remove the file)")
    assert res.returncode == 1, out  # torchrun's own code for any failed worker
    assert out.splitlines().count(line) == 1, out  # printed once, by rank 0
    assert f"traceback : {line}" in out and "To enable traceback" not in out, out
    assert "exitcode  : 2" in out and "exitcode  : 1" not in out, out
    assert "eaft_megatron/train" not in out.replace(line, ""), out  # no worker traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landscape.png"]  # nothing written
