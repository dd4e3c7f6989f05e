"""The trainer as a cluster treats it: requeues, kill -9, divergence, mistakes, ``--help``.

    python -m pytest -q tests/train/test_restart.py

Real torchrun launches of ``python -m eaft_megatron.train`` (gloo, CPU, Megatron's own loop) on the
tiny fixtures of ``tests/support/fixtures.py``; the restart rules themselves are also checked
in-process on checkpoint directories laid out by hand.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support.launch import (ROOT, check, copy_tiny, run_train, subprocess_env,
                                  torchrun)

REL = 1e-5
COMMON = ["--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3", "--min-lr",
          "1e-3", "--lr-decay-style", "constant", "--log-interval", "1", "--seed", "1234",
          "--eval-interval", "1000", "--eval-iters", "0", "--loss-type", "eaft"]
ITERS = 24  # long enough that the kill below lands mid-run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_inputs):
    return copy_tiny(tiny_inputs, tmp_path_factory.mktemp("restart"))


def _fake_checkpoint(root: Path, iterations: list[int], tracker: int | None,
                     incomplete: tuple[int, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for it in iterations:
        (root / f"iter_{it:07d}").mkdir()
        (root / f"iter_{it:07d}" / ".metadata").write_bytes(b"")
    for it in incomplete:
        (root / f"iter_{it:07d}").mkdir()
        (root / f"iter_{it:07d}" / "__0_0.distcp").write_bytes(b"partial")
    if tracker is not None:
        (root / "latest_checkpointed_iteration.txt").write_text(str(tracker))
    return root


# ---------------------------------------------------------------------------------------------
# The rules, in-process


def test_restart_rules(tmp_path):
    from eaft_megatron.train.restart import CheckpointError, resolve_start

    ckpt = _fake_checkpoint(tmp_path / "ckpt", [0], 0)
    (ckpt / "eaft_megatron.json").write_text("{}")
    run = tmp_path / "run"

    def start(**kw):
        base = dict(load=None, save=str(run), pretrained=None, finetune=False, ckpt_step=None,
                    training=True)
        return resolve_start(**{**base, **kw})

    # first launch, both spellings: fine-tune from the converted model
    for kw in (dict(load=str(ckpt)), dict(load=str(run), pretrained=str(ckpt))):
        s = start(**kw)
        assert (s.load, s.finetune, s.resumed, s.iteration) == (str(ckpt), True, False, 0)
    # the run saved 4 and 6, then died while saving 8: a rerun resumes from 6, whatever it says
    _fake_checkpoint(run, [4, 6], 6, incomplete=(8,))
    for kw in (dict(load=str(ckpt)), dict(load=str(run), pretrained=str(ckpt)),
               dict(load=str(ckpt), finetune=True), dict()):
        s = start(**kw)
        assert (s.load, s.finetune, s.resumed, s.iteration) == (str(run), False, True, 6), kw
        assert "resuming from" in s.note and "iter_0000006" in s.note
    with pytest.raises(CheckpointError, match="already holds iteration 6"):
        start(load=str(run), ckpt_step=4)  # would overwrite iteration 6 later
    # evaluation only never redirects --load
    s = start(load=str(ckpt), training=False)
    assert s.load == str(ckpt) and s.finetune
    # named and empty: an error naming the directory, never random weights
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"--load {empty}: no checkpoint there"):
        start(load=str(empty), save=str(tmp_path / "new"))
    with pytest.raises(CheckpointError, match=f"--pretrained-checkpoint {empty}: no checkpoint"):
        start(load=str(tmp_path / "new"), save=str(tmp_path / "new"), pretrained=str(empty))
    with pytest.raises(CheckpointError, match="no such directory"):
        start(load=str(tmp_path / "typo"), save=str(tmp_path / "new"))
    assert start(save=str(tmp_path / "new")).load is None  # no flag at all: random on purpose
    # a tracker that names an incomplete directory, complete iterations without a tracker
    bad = _fake_checkpoint(tmp_path / "bad", [2], 4, incomplete=(4,))
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        start(save=str(bad))
    orphan = _fake_checkpoint(tmp_path / "orphan", [2, 4], None)
    with pytest.raises(CheckpointError, match=r"no latest_checkpointed_iteration.txt"):
        start(load=str(ckpt), save=str(orphan))


def test_argument_mistakes_are_named(tmp_path, tiny):
    from eaft_megatron.train.argv import TrainArgError, complete_argv, flag_value

    ckpt, data = str(tiny["ckpt"]), str(tiny["data"])

    def complete(*argv):
        return complete_argv(list(argv), cpu=True, te_available=False)

    argv, info = complete("--load", str(tmp_path / "run"), "--save", str(tmp_path / "run"),
                          "--pretrained-checkpoint", ckpt, "--data-path", data)
    assert flag_value(argv, "--load") == ckpt and "--finetune" in argv
    assert "--pretrained-checkpoint" not in argv and flag_value(argv, "--seq-length") == "32"
    cases = [
        (["--data-path", data + "x"],
         r"--data-path .*trainx: not a complete prepared dataset "
         r"\(expected trainx_tokens.bin/.idx, .*trainx_summary.json.* in .*; "
         r"prepared prefixes in .*data/train$"),
        (["--data-path", data, "--valid-data-path", str(tmp_path / "v")], "--valid-data-path"),
        (["--tensor-model-parallel-size", "3"], "does not divide the model's 4 attention heads"),
        (["--pipeline-model-parallel-size", "3"], "does not divide the model's 2 layers"),
        (["--eaft-top-k", "0"], "invalid EAFT flags: .*top_k"),
        (["--eaft-top-k", "301"], "exceeds the vocabulary"),
        (["--eaft-alpha", "x"], "--eaft-alpha: invalid float value"),
        (["--loss-type", "ce"], "invalid choice"),
    ]
    for extra, message in cases:
        with pytest.raises(TrainArgError, match=message):
            complete("--load", ckpt, "--save", str(tmp_path / "r"), *extra)
    other = tmp_path / "other_hf"
    from tests.support.tiny_models import train_config

    config = train_config()
    config.hidden_size = 128
    config.save_pretrained(other)
    with pytest.raises(TrainArgError, match="is a different model than --hf-config"):
        complete("--pretrained-checkpoint", ckpt, "--hf-config", str(other))


def test_crafted_metadata_is_refused_before_loading(tmp_path, tiny):
    """A checkpoint whose .metadata is a pickle payload: the trainer refuses it (naming the
    file) before megatron-core's loader would unpickle it, and the payload never runs."""
    import pickle
    import shutil

    from eaft_megatron.train.argv import TrainArgError, complete_argv

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "run"
    shutil.copytree(tiny["ckpt"], run)
    metadata = run / "iter_0000000" / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(TrainArgError, match=f"{metadata}.*refused"):
        complete_argv(["--load", str(run), "--save", str(run), "--data-path", str(tiny["data"])],
                      cpu=True, te_available=False)
    metadata.write_bytes(metadata.read_bytes()[:5])  # and a truncated one is named too
    with pytest.raises(TrainArgError, match=f"{metadata} is truncated or corrupt"):
        complete_argv(["--load", str(run), "--save", str(run), "--data-path", str(tiny["data"])],
                      cpu=True, te_available=False)
    assert not marker.exists()


def test_help_lists_the_eaft_flags(tmp_path):
    env = subprocess_env(XDG_CACHE_HOME=str(tmp_path))  # a cache of --help's text of its own
    proc = subprocess.run([sys.executable, "-m", "eaft_megatron.train", "--help"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    [cached] = (tmp_path / "eaft-megatron").glob("train-help-*.txt")
    again = subprocess.run([sys.executable, "-X", "importtime", "-m", "eaft_megatron.train",
                            "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and again.stdout == out == cached.read_text()
    imported = {line.split("|")[-1].strip() for line in again.stderr.splitlines()}
    assert not {"torch", "megatron.core", "megatron.training"} & imported  # the cached text
    eaft = out[out.index("EAFT (eaft_megatron)"):]
    for flag in ("--loss-type", "--eaft-top-k", "--eaft-alpha", "--eaft-entropy",
                 "--hf-config", "--log-dir"):
        assert flag in eaft.split("\n\n")[0] or flag in eaft[:4000], flag
    assert "--pretrained-checkpoint" in out and "--tensor-model-parallel-size" in out
    assert "--moe-paged-stash-buffer-size-factor-cuda" in out  # the help string megatron breaks
    assert "No CUDA runtime" not in proc.stderr, proc.stderr  # torch's notice on CPU: dropped
    top_k = eaft[eaft.index("--eaft-top-k"):eaft.index("--eaft-alpha")]
    assert "(default: 20)" in " ".join(top_k.split()), top_k  # the EAFT flags show defaults


def test_help_percent_escape():
    from eaft_megatron.train.main import _escape_bare_percent

    for good in ("50%% of %(default)s", "plain", "%(prog)s"):
        assert _escape_bare_percent(good) == good
    assert _escape_bare_percent("a 10% factor, %(default)s") == "a 10%% factor, %(default)s"
    assert _escape_bare_percent("100%") % {} == "100%"


def test_one_line_error_and_exit_2(tmp_path, tiny):
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = torchrun("-m", "eaft_megatron.train",
                   "--load", str(empty), "--hf-config", str(tiny["ckpt"] / "hf"),
                   "--data-path", str(tiny["data"]), *COMMON, nproc=2)
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("eaft_megatron.train: error")]
    assert lines == [f"eaft_megatron.train: error: --load {empty}: no checkpoint there (no "
                     "latest_checkpointed_iteration.txt); refusing to train from random weights "
                     "(omit --load/--pretrained-checkpoint to do that on purpose)"]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert "eaft_megatron/train/" not in proc.stderr  # no frame of ours in torchrun's summary
    direct = subprocess.run([sys.executable, "-m", "eaft_megatron.train", "--load", str(empty),
                             "--hf-config", str(tiny["ckpt"] / "hf")], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert direct.returncode == 2 and str(empty) in direct.stderr


# ---------------------------------------------------------------------------------------------
# Megatron's real loop


def _launch(tiny, run: Path) -> list[str]:
    return ["--load", str(tiny["ckpt"]), "--save", str(run), "--data-path", str(tiny["data"]),
            "--save-interval", "2", "--train-iters", str(ITERS),
            "--tensor-model-parallel-size", "2", "--use-distributed-optimizer", *COMMON]


def _popen(log_dir: Path, args: list[str], log) -> subprocess.Popen:
    cmd = torchrun("-m", "eaft_megatron.train", "--log-dir", str(log_dir), "--num-workers", "0",
                   *args, nproc=2)
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _records(log_dir: Path) -> list[dict]:
    path = log_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _snapshot(root: Path, up_to: int) -> dict:
    """(inode, mtime, size) of every file of the complete iterations <= up_to."""
    out = {}
    for d in sorted(root.glob("iter_*")):
        if int(d.name[5:]) <= up_to and (d / ".metadata").is_file():
            for f in d.rglob("*"):
                st = f.stat()
                out[str(f)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def test_kill_9_then_identical_rerun_resumes(tiny):
    """With the distributed optimizer (as clusters run): megatron-core 0.19.2 without TE/apex
    cannot resume it at all, and restores Adam's step wrongly (eaft_megatron/compat/optimizer.py);
    the resumed losses and gradient norms below catch both."""
    straight = tiny["root"] / "straight"
    reference = check(run_train(straight, *_launch(tiny, straight), nproc=2)).train()
    assert sorted(reference) == list(range(1, ITERS + 1))

    run = tiny["root"] / "killed"
    log = open(tiny["root"] / "killed.log", "w")
    proc = _popen(run, _launch(tiny, run), log)
    tracker = run / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 240
    while not (tracker.is_file() and int(tracker.read_text() or 0) >= 2):
        assert proc.poll() is None and time.time() < deadline, \
            (tiny["root"] / "killed.log").read_text()[-4000:]
        time.sleep(0.02)
    family = psutil.Process(proc.pid).children(recursive=True)  # ranks and whatever they started
    ranks = [c for c in family if "eaft_megatron.train" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    ranks[-1].send_signal(signal.SIGKILL)  # what the OOM killer does to one worker
    assert proc.wait(timeout=120) != 0  # the dead worker takes the job down: no hang
    log.close()
    time.sleep(2)
    survivors = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not survivors, [p.cmdline() for p in survivors]  # no writer, tracker or rank left
    killed_at = max(r["iteration"] for r in _records(run) if r["kind"] == "train")
    assert killed_at < ITERS
    resume_point = int(tracker.read_text())
    before = _snapshot(run, resume_point)

    rerun = check(run_train(run, *_launch(tiny, run), nproc=2))  # the identical command
    assert f"resuming from {run / f'iter_{resume_point:07d}'}" in rerun.output
    restarts = [i for i, r in enumerate(rerun.records) if r["kind"] == "restart"]
    assert restarts and rerun.records[restarts[-1]]["iteration"] == resume_point
    resumed = {r["iteration"]: r for r in rerun.records[restarts[-1]:] if r["kind"] == "train"}
    assert sorted(resumed) == list(range(resume_point + 1, ITERS + 1))
    for it, record in resumed.items():
        assert record["consumed_samples"] == reference[it]["consumed_samples"]
        for key in ("loss", "lm_loss", "grad_norm"):
            assert record[key] == pytest.approx(reference[it][key], rel=REL), (it, key)
    assert _snapshot(run, resume_point) == before  # nothing older than the resume point rewritten
    assert int(tracker.read_text()) == ITERS  # (a rerun of a finished run: test_sft_scripts)


def _checkpoint_is_finite(iteration_dir: Path) -> bool:
    """Every tensor stored in a torch_dist checkpoint (model and optimizer state) is finite."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(iteration_dir)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
    load(state, storage_reader=FileSystemReader(str(iteration_dir)), no_dist=True)
    assert state
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


@pytest.mark.parametrize("lr", ["1e6", "inf"], ids=["huge-lr", "infinite-lr"])
def test_diverging_run_stops_and_saves_nothing_non_finite(tiny, lr):
    """Megatron's own NaN check off. 1e6: the gradient norm turns non-finite at iteration 3;
    inf: the first update makes the parameters non-finite while loss and gradient norm are
    finite, and the save of iteration 1 is refused."""
    run = tiny["root"] / f"diverge-{lr}"
    args = ["--load", str(tiny["ckpt"]), "--save", str(run), "--data-path", str(tiny["data"]),
            "--save-interval", "1", "--train-iters", "6", "--no-check-for-nan-in-loss-and-grad",
            *COMMON, "--lr", lr]
    result = run_train(run, *args, nproc=1)
    assert result.returncode != 0
    [message] = [x for x in result.output.splitlines()
                 if x.startswith("eaft_megatron.train: error: ")]
    assert "non-finite" in message and "Last good checkpoint:" in message
    saved = sorted(run.glob("iter_*"))
    for d in saved:
        assert _checkpoint_is_finite(d), d
    if lr == "inf":
        assert not saved and "not saving the checkpoint of iteration 1" in message
        assert f"Last good checkpoint: {tiny['ckpt'] / 'iter_0000000'}" in message
    else:
        assert saved and f"Last good checkpoint: {saved[-1]}" in message
        assert f"at iteration {int(saved[-1].name[5:]) + 1}" in message
