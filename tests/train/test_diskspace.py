"""A full disk during a checkpoint save (``eaft_megatron.train.diskspace``), on real small tmpfs
mounts (skipped where mounting is not allowed): the trainer refuses a save that does not fit in
one line naming the filesystem, the estimate and the free space, and the last complete
checkpoint stays; a real torch_dist (DCP) save that runs out of space mid-write -- torch reports
it as ``CheckpointException`` with a ``RuntimeError ... unexpected pos``, no errno -- is
recognised as such."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from eaft_megatron.train.diskspace import enospc_in, mount_of, no_space_error
from tests.support.launch import ROOT, subprocess_env


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (not root)")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_a_real_save_running_out_of_space_is_named(tmpfs):
    fs = tmpfs("64k")
    with pytest.raises(OSError) as raised:  # the plain case: the errno is there
        (fs / "big").write_bytes(b"x" * 200_000)
    assert enospc_in(raised.value).errno == errno.ENOSPC
    (fs / "big").unlink()
    code = ("import os, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp\n"
            "from types import SimpleNamespace\n"
            "from eaft_megatron.compat.processes import free_port\n"
            "from eaft_megatron.train.diskspace import no_space_error\n"
            "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))\n"
            "dist.init_process_group('gloo', rank=0, world_size=1)\n"
            "try:\n"
            f"    dcp.save({{'w': torch.zeros(100000)}}, checkpoint_id='{fs}/iter_0000005')\n"
            "except BaseException as e:\n"
            "    print(type(e).__name__)\n"
            f"    args = SimpleNamespace(save='{fs}')\n"
            "    print(no_space_error(e, args, 5, needed=400000, last='none'))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    out = res.stdout.splitlines()
    assert out[0] == "CheckpointException", res.stdout + res.stderr
    assert out[1].startswith(f"no space left on {fs} for {fs} (needed ~390.6 KiB, free "), out
    assert "checkpoint of iteration 5; the last complete checkpoint is none" in out[1]
    # a failed save with room left is not called a full disk
    assert no_space_error(RuntimeError("boom"), SimpleNamespace(save=str(fs.parent)), 5,
                          needed=1000, last="none") is None
    assert mount_of(fs / "not" / "yet") == fs


def test_the_trainer_refuses_a_save_that_does_not_fit(tmpfs, tiny_inputs):
    """2.5 MB: the tiny model's first checkpoint (1.54 MB: fp32 weights + Adam's moments; the
    estimate says ~1.3 MiB) fits, the second does not: stopped before writing it, exit 3,
    iteration 1 complete and the tracker at 1."""
    save = tmpfs("2500k") / "run"
    res = subprocess.run([sys.executable, "-m", "eaft_megatron.train",
                          "--load", str(tiny_inputs / "mcore"), "--save", str(save),
                          "--data-path", str(tiny_inputs / "data" / "train"),
                          "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3",
                          "--train-iters", "2", "--save-interval", "1", "--eval-iters", "0",
                          "--eval-interval", "1000", "--num-workers", "0"],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-3000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("eaft_megatron.train: error")]
    assert len(errors) == 1 and re.match(
        f"eaft_megatron.train: error: no space left on {save.parent} for {save} \\(needed "
        f"~1\\.[0-9] MiB, free [0-9.]+ KiB\\) ", errors[0]), res.stderr[-3000:]
    assert (f"to save the checkpoint of iteration 2; the last complete checkpoint is "
            f"{save / 'iter_0000001'}") in errors[0]
    assert "CheckpointException" not in res.stderr and "Traceback" not in res.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (save / "iter_0000001" / "metadata.json").is_file()
    assert not (save / "iter_0000002").exists()
