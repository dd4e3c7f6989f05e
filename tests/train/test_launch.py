"""``eaft-megatron train`` (``eaft_megatron.train.launch``): torchrun in-process, with the
workers' one-line error and exit status instead of torchrun's report and status 1. One real
launch of 2 workers with a mistake; the command-line split and the choice of the failure to
report are checked in-process."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from eaft_megatron.train.launch import _precedence, split_argv
from tests.support.launch import ROOT, free_port, subprocess_env


def test_a_mistake_exits_2_with_the_workers_line_and_no_traceback(tiny_inputs, tmp_path):
    missing = tmp_path / "nope" / "train"
    scratch = tmp_path / "tmp"  # the launch's temporary directory (TMPDIR)
    scratch.mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "eaft_megatron", "train", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", f"--master-port={free_port()}",
         "--load", str(tiny_inputs / "mcore"), "--data-path", str(missing),
         "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3",
         "--train-iters", "2"], cwd=ROOT, env=subprocess_env(TMPDIR=str(scratch)),
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-4000:]
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines == [f"eaft_megatron.train: error: --data-path {missing}: not a complete "
                     f"prepared dataset (expected train_tokens.bin/.idx, train_loss_mask.bin/"
                     f".idx, train_summary.json, train_provenance.npy in {missing.parent})"], \
        res.stderr[-4000:]
    assert "Traceback" not in res.stdout + res.stderr
    assert "ChildFailedError" not in res.stdout + res.stderr
    assert not missing.parent.exists()
    # torchrun's per-launch log directory (torchelastic_*, empty here) is not left behind
    assert not [p for p in scratch.rglob("*") if "torchelastic_" in p.name or
                p.name.startswith("eaft-torchrun-")], sorted(scratch.rglob("*"))


def test_launcher_options_first_then_the_trainers_flags():
    assert split_argv(["--nproc-per-node", "2", "--nproc_per_node=4", "--standalone",
                       "--load", "ckpt", "--log-dir", "l"]) == (
        ["--nproc-per-node", "2", "--nproc-per-node=4", "--standalone"],
        ["--load", "ckpt", "--log-dir", "l"])  # torchrun's own --log-dir is not taken
    assert split_argv(["--nnodes", "2", "--", "--nnodes", "x"]) == (
        ["--nnodes", "2"], ["--nnodes", "x"])
    assert split_argv(["--save", "s", "--nproc-per-node", "2"]) == (
        [], ["--save", "s", "--nproc-per-node", "2"])
    assert split_argv(["--nproc-per-node", "2", "--help"]) is None
    assert split_argv(["--nproc-per-node", "2", "--lr", "1", "--help"])[1] == ["--lr", "1",
                                                                               "--help"]


def test_the_failure_reported_is_the_cause_not_the_workers_torchrun_stopped():
    line = "eaft_megatron.train: error: x"

    def failure(code, message=""):
        return SimpleNamespace(exitcode=code, timestamp=0, message=message)

    def pick(failures):
        return min(failures.items(), key=_precedence)[0]

    # a mistake: rank 1 exited 2 with it, rank 0 was stopped (SIGTERM) after writing it too
    assert pick({0: failure(-15, {"message": line}), 1: failure(2, {"message": line})}) == 1
    # kill -9 of rank 1: rank 0 crashed on the lost peer (status 1) or was stopped (-15)
    assert pick({0: failure(1), 1: failure(-9)}) == 1
    assert pick({0: failure(-15), 1: failure(-9)}) == 1
    # a crash on rank 1, rank 0 stopped by torchrun
    assert pick({0: failure(-15), 1: failure(1)}) == 1
