"""A full disk during a checkpoint save (``eaft_megatron.train.diskspace``), on real small tmpfs
mounts (skipped where mounting is not allowed): the trainer stops with exit 2 and one line naming
the filesystem, the estimate and the free space, whether the save ran out of space mid-write
(its partial directory removed) or the pre-save check found too little; the last complete
checkpoint and the tracker stay and the rerun resumes from them; a real torch_dist (DCP) save
that runs out of space mid-write -- torch reports it as ``CheckpointException`` with a
``RuntimeError ... unexpected pos``, no errno -- is recognised as such."""

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
            "from eaft_megatron.train.diskspace import no_space_error, short_write_in\n"
            "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))\n"
            "dist.init_process_group('gloo', rank=0, world_size=1)\n"
            "try:\n"
            f"    dcp.save({{'w': torch.zeros(100000)}}, checkpoint_id='{fs}/iter_0000005')\n"
            "except BaseException as e:\n"
            "    print(type(e).__name__)\n"
            f"    args = SimpleNamespace(save='{fs}')\n"
            "    print(no_space_error(e, args, 5, needed=400000, last='none'))\n"
            "    print(short_write_in(e))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    out = res.stdout.splitlines()
    assert out[0] == "CheckpointException", res.stdout + res.stderr
    assert out[1].startswith(f"no space left on {fs} for {fs} (needed ~390.6 KiB, free "), out
    assert "checkpoint of iteration 5; the last complete checkpoint is none" in out[1]
    assert out[2] == "True"  # torch's short write, recognised without the free-space test
    # a failed save with room left is not called a full disk
    assert no_space_error(RuntimeError("boom"), SimpleNamespace(save=str(fs.parent)), 5,
                          needed=1000, last="none") is None
    assert mount_of(fs / "not" / "yet") == fs


def test_a_full_disk_stops_the_trainer_in_one_line_and_the_rerun_resumes(tmpfs, tiny_inputs):
    """Two real launches of the same command on a 2920 KiB tmpfs. The tiny model's checkpoint
    takes 1.49 MiB (fp32 weights + Adam's moments + metadata), the estimate says ~1.3 MiB. The
    first launch saves iteration 1 (1524 KiB used with hf/ and metrics.jsonl), then iteration
    2's estimate fits in the 1396 KiB left but the real save runs out of space mid-write: exit
    2, one line, the partly written iter_0000002 removed. The rerun, with 200 KiB more taken,
    resumes from iteration 1 and is stopped before writing iteration 2 by the free-space
    check. Both times iteration 1 and the tracker stay as they were."""
    fs = tmpfs("2920k")
    save = fs / "run"
    cmd = [sys.executable, "-m", "eaft_megatron.train", "--load", str(tiny_inputs / "mcore"),
           "--save", str(save), "--data-path", str(tiny_inputs / "data" / "train"),
           "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3",
           "--train-iters", "2", "--save-interval", "1", "--eval-iters", "0",
           "--eval-interval", "1000", "--num-workers", "0"]

    def launch(more: str):
        res = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
        errors = [x for x in res.stderr.splitlines() if "error" in x.lower()
                  and not x.startswith("ERROR:megatron.core.dist_checkpointing")]
        assert len(errors) == 1 and re.match(
            f"eaft_megatron.train: error: no space left on {fs} for {save} \\(needed {more}"
            f"~1\\.[0-9] MiB, free 1\\.[0-9] MiB\\) to save the checkpoint of iteration 2; "
            f"the last complete checkpoint is {save / 'iter_0000001'}: free space or give "
            f"another --save", errors[0]), res.stderr[-3000:]
        assert "Traceback" not in res.stderr and "CheckpointException" not in res.stderr
        assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
        assert sorted(p.name for p in (save / "iter_0000001").iterdir()) == [
            ".metadata", "__0_0.distcp", "metadata.json"]
        assert not (save / "iter_0000002").exists()
        return res

    launch("more than ")  # ran out mid-write (torch: "unexpected pos"), the partial save gone
    (fs / "other").write_bytes(b"x" * 200 * 1024)  # another writer takes 200 KiB
    rerun = launch("")  # refused before writing
    assert f"resuming from {save / 'iter_0000001'}" in rerun.stdout
