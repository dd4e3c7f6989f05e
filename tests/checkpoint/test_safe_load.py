"""The trainer never unpickles a checkpoint freely (``eaft_megatron/checkpoint/safe_load.py``).

    python -m pytest -q tests/checkpoint/test_safe_load.py

A real trainer checkpoint (the tiny Qwen3 of ``tests/support/fixtures.py``, 2 iterations, optimizer
and RNG state) is read entry by entry through the safe path and compared with torch's own free
unpickling; payloads planted in its common state, an ``_extra_state`` entry, the RNG entry and a
``common.pt`` are refused before anything runs (in-process, and by the real command: exit 2, one
line, nothing written), and a checkpoint swapped for a crafted one after that check is refused by
the loader inside ``pretrain()`` (one direct launch). The payload never runs. (Resuming through the
safe path is ``test_pretrain.py::test_resume_equals_straight``.)
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support.launch import (ROOT, check, copy_tiny, free_port, run_module, run_train,
                                  subprocess_env)

COMMON = ["--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3",
          "--log-interval", "1", "--seed", "1234", "--eval-iters", "0",
          "--eval-interval", "1000", "--loss-type", "eaft"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_inputs):
    return copy_tiny(tiny_inputs, tmp_path_factory.mktemp("safeload"))


@pytest.fixture(scope="module")
def trained(tiny) -> Path:
    """A checkpoint the trainer wrote at iteration 2 (model, optimizer, scheduler, RNG)."""
    out = tiny["root"] / "trained"
    check(run_train(out, "--load", str(tiny["ckpt"]), "--save", str(out), "--save-interval",
                    "2", "--train-iters", "2", "--data-path", str(tiny["data"]), *COMMON))
    return out


class _Payload:
    """Unpickling this runs ``touch <marker>`` (as a crafted checkpoint would)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _byte_entries(iteration_dir: Path) -> dict:
    """fqn -> (file, offset, length) of every pickled (byte) entry."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from eaft_megatron.checkpoint import read_checkpoint_metadata

    meta = read_checkpoint_metadata(iteration_dir)
    return {index.fqn: (iteration_dir / info.relative_path, info.offset, info.length)
            for index, info in meta.storage_data.items()
            if isinstance(meta.state_dict_metadata[index.fqn], BytesStorageMetadata)}


def _plant(iteration_dir: Path, fqn: str, data: bytes) -> Path:
    """Append ``data`` to the entry's data file and point the entry at it; the data file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from eaft_megatron.checkpoint import read_checkpoint_metadata

    meta = read_checkpoint_metadata(iteration_dir)
    [index] = [i for i in meta.storage_data if i.fqn == fqn]
    distcp = iteration_dir / meta.storage_data[index].relative_path
    offset = distcp.stat().st_size
    with open(distcp, "ab") as f:
        f.write(data)
    meta.storage_data[index] = _StorageInfo(distcp.name, offset, len(data))
    (iteration_dir / ".metadata").write_bytes(pickle.dumps(meta))
    return distcp


def _read(file: Path, offset: int, length: int) -> bytes:
    with open(file, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if hasattr(a, "__array__") and not isinstance(a, (int, float)):
        import numpy as np

        return type(a) is type(b) and np.array_equal(a, b)
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return type(a) is type(b) and _same(vars(a), vars(b))
    return a == b


# ---------------------------------------------------------------------------------------------
# A real trainer checkpoint reads the same through the safe path


def test_every_entry_of_a_trainer_checkpoint_loads_as_torch_loads_it(tiny, trained):
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    from eaft_megatron.checkpoint import validate_checkpoint_metadata
    from eaft_megatron.checkpoint.safe_load import (check_checkpoint_entries, load_checked,
                                                    safe_checkpoint_loading)

    iteration_dir = trained / "iter_0000002"
    entries = _byte_entries(iteration_dir)
    kinds = {fqn.split("/")[0].split(".")[-1] for fqn in entries}
    assert {"common_state", "rng_state", "rerun_state_machine_state", "_extra_state"} <= kinds
    for directory in (iteration_dir, tiny["ckpt"] / "iter_0000000"):
        check_checkpoint_entries(directory, validate_checkpoint_metadata(directory))
    for fqn, where in entries.items():
        data = _read(*where)
        oracle = torch.load(io.BytesIO(data), weights_only=False)  # our own checkpoint
        assert _same(load_checked(data, fqn), oracle), fqn

    with safe_checkpoint_loading():  # megatron-core's own reader, through the replaced readers
        common = load_common_state_dict(str(iteration_dir))
    free = load_common_state_dict(str(iteration_dir))
    assert common["iteration"] == 2 and _same(common, free)
    assert _same(common["optimizer"], free["optimizer"]) and "param_groups" in common["optimizer"]


# ---------------------------------------------------------------------------------------------
# Payloads: refused before anything runs, naming file, entry and global


def _complete(run: Path, tiny, *extra: str):
    from eaft_megatron.train.argv import complete_argv

    return complete_argv(["--load", str(run), "--save", str(run), "--data-path",
                          str(tiny["data"]), *extra], cpu=True, te_available=False)


def test_payloads_in_any_pickled_entry_are_refused_before_loading(tiny, trained, tmp_path):
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    from eaft_megatron.checkpoint.safe_load import refusal, safe_checkpoint_loading
    from eaft_megatron.train.argv import TrainArgError

    entries = _byte_entries(trained / "iter_0000002")
    extra_state = sorted(f for f in entries if "._extra_state/" in f)[0]
    rng = [f for f in entries if f.startswith("rng_state/")][0]
    marker = tmp_path / "pwned"
    for n, fqn in enumerate(["common_state/shard_0_1", extra_state, rng]):
        run = tmp_path / f"run{n}"
        shutil.copytree(trained, run)
        distcp = _plant(run / "iter_0000002", fqn, _saved(_Payload(marker)))
        with pytest.raises(TrainArgError) as refused:
            _complete(run, tiny)
        assert str(refused.value) == (
            f"{distcp}, entry {fqn}, refers to posix.system, which a Megatron checkpoint never "
            f"stores: refused (unpickling it could run code; --eaft-trust-checkpoint loads it "
            f"anyway, allowing arbitrary code execution)")
        assert not marker.exists()
        _complete(run, tiny, "--eaft-trust-checkpoint")  # the opt-out: no check, nothing read
        assert not marker.exists()

    # the oracle: megatron-core's own loader runs the common-state payload; the replaced
    # readers refuse it
    with safe_checkpoint_loading(), pytest.raises(BaseException) as refused:
        load_common_state_dict(str(tmp_path / "run0" / "iter_0000002"))
    assert "common_state/shard_0_1, refers to posix.system" in str(refused.value)  # wrapped
    assert "common_state/shard_0_1, refers to posix.system" in refusal()  # what main() prints
    assert not marker.exists()
    with pytest.raises(TypeError):  # the payload's result (an int) is not a state dict
        load_common_state_dict(str(tmp_path / "run0" / "iter_0000002"))
    assert marker.exists()
    marker.unlink()

    # a plain pickle (not a torch.save archive), a common.pt, legacy torch-format files
    run = tmp_path / "raw"
    shutil.copytree(trained, run)
    distcp = _plant(run / "iter_0000002", "common_state/shard_0_1", pickle.dumps(_Payload(marker)))
    with pytest.raises(TrainArgError, match=f"{distcp}, entry common_state/shard_0_1, is not a "
                       "torch.save pickle that can be checked without running it"):
        _complete(run, tiny)
    run = tmp_path / "common_pt"
    shutil.copytree(trained, run)
    (run / "iter_0000002" / "common.pt").write_bytes(_saved({"args": _Payload(marker)}))
    with pytest.raises(TrainArgError, match=f"{run / 'iter_0000002' / 'common.pt'} refers to "
                       "posix.system"):
        _complete(run, tiny)
    run = tmp_path / "legacy"
    shutil.copytree(trained, run)
    (run / "iter_0000002" / "metadata.json").unlink()
    (run / "iter_0000002" / "mp_rank_00").mkdir()
    with pytest.raises(TrainArgError, match="holds legacy torch-format files"):
        _complete(run, tiny)
    assert not marker.exists()


def test_the_real_command_exits_2_with_one_line_and_writes_nothing(tiny, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "pwned"
    distcp = _plant(run / "iter_0000002", "common_state/shard_0_1", _saved(_Payload(marker)))
    save = tmp_path / "new_run"
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_module("eaft_megatron.train", "--load", run, "--save", save,
                      "--data-path", tiny["data"], *COMMON)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("eaft_megatron.train: error")]
    assert lines == [f"eaft_megatron.train: error: {distcp}, entry common_state/shard_0_1, refers "
                     "to posix.system, which a Megatron checkpoint never stores: refused "
                     "(unpickling it could run code; --eaft-trust-checkpoint loads it anyway, "
                     "allowing arbitrary code execution)"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_checkpoint_swapped_after_the_check_is_refused_by_the_loader(tiny, trained, tmp_path):
    """The second layer, inside pretrain(): the checkpoint is replaced by a crafted one after
    the start-up check (the trainer prints its start line right before pretrain())."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    crafted = tmp_path / "crafted"
    shutil.copytree(trained / "iter_0000002", crafted)
    marker = tmp_path / "pwned"
    distcp = _plant(crafted, "common_state/shard_0_1", _saved(_Payload(marker)))
    env = subprocess_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "eaft_megatron.train", "--load", str(run), "--save", str(run),
             "--data-path", str(tiny["data"]), "--train-iters", "4", "--save-interval", "100",
             "--override-opt_param-scheduler", "--num-workers", "0", *COMMON],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 300
            while "> eaft_megatron.train: model from" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            iteration_dir = run / "iter_0000002"
            iteration_dir.rename(tmp_path / "aside")
            crafted.rename(iteration_dir)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert proc.returncode == 2, text[-4000:]
    swapped = iteration_dir / distcp.name
    lines = [x for x in text.splitlines() if x.startswith("eaft_megatron.train: error")]
    assert lines == [f"eaft_megatron.train: error: {swapped}, entry common_state/shard_0_1, "
                     "refers to posix.system, which a Megatron checkpoint never stores: refused "
                     "(unpickling it could run code; --eaft-trust-checkpoint loads it anyway, "
                     "allowing arbitrary code execution)"], text[-4000:]
    assert not marker.exists()
