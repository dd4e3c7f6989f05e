"""One training job per ``--save`` (``eaft_megatron.train.lock``): a live owner refuses a second
job in one line (a real trainer process against a lock held by this live test process, and
three real launches on one ``--save``: a training job, a second one refused while it lives, a
third one after ``kill -9`` of the first that takes the stale lock over and resumes), a dead
owner's or a silent remote owner's lock is taken over with a message, ``--eaft-force-lock``
forces; a finished run removes its lock (also checked after real runs in
tests/examples/test_sft_scripts.py)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from eaft_megatron.train.lock import LOCK_NAME, STALE_S, LockError, acquire
from tests.support.fixtures import write_data
from tests.support.launch import ROOT, free_port, subprocess_env, torchrun
from tests.support.tiny_models import train_config


def _owner(path):
    return json.loads(path.read_text())


def test_a_live_job_refuses_a_second_one_in_one_line(tmp_path):
    save = tmp_path / "run"
    held = acquire(save)  # this live process is the first job
    try:
        hf = tmp_path / "hf"
        train_config().save_pretrained(hf)
        data = write_data(tmp_path / "data" / "train", n=4)
        res = subprocess.run([sys.executable, "-m", "eaft_megatron.train", "--hf-config", str(hf),
                              "--data-path", str(data), "--save", str(save), "--train-iters",
                              "1", "--micro-batch-size", "1", "--global-batch-size", "1",
                              "--lr", "1e-4", "--save-interval", "1"], cwd=ROOT,
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res.stderr[-3000:]
        lines = [x for x in res.stderr.splitlines() if x.strip() and "No CUDA runtime" not in x]
        assert len(lines) == 1 and lines[0].startswith(
            f"eaft_megatron.train: error: --save {save} is in use by another training job (host "
            f"{held.owner['host']} pid {os.getpid()}, started "), res.stderr[-3000:]
        assert lines[0].endswith(f"; {save / LOCK_NAME}): wait for it or stop it, or pass "
                                 f"--eaft-force-lock if it is gone"), lines[0]
        assert sorted(p.name for p in save.iterdir()) == [LOCK_NAME]  # nothing else written
        assert _owner(save / LOCK_NAME)["pid"] == os.getpid()
    finally:
        held.release()
    assert not (save / LOCK_NAME).exists()


def test_stale_locks_are_taken_over_and_force_overrides(tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    lock = save / LOCK_NAME
    said = []
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    from eaft_megatron.paths import _host

    # this host, the process is gone
    lock.write_text(json.dumps({"host": _host(), "pid": gone.pid, "start": 1, "time": 0}))
    mine = acquire(save, report=said.append)
    assert said == [f"took over the lock of --save {save} from host {_host()} pid {gone.pid}, "
                    f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(0))} (its "
                    f"process is gone)"]
    assert _owner(lock)["pid"] == os.getpid() and _owner(lock)["host"] == _host()
    with pytest.raises(LockError, match=f"--save {save} is in use by another training job"):
        acquire(save)  # a live owner (this process)
    mine.release()
    assert not lock.exists()

    # another host: alive while its heartbeat is fresh, gone after STALE_S
    lock.write_text(json.dumps({"host": f"not-{host}", "pid": 1, "start": 1, "time": 0}))
    with pytest.raises(LockError, match=f"host not-{host} pid 1"):
        acquire(save)
    old = time.time() - STALE_S - 30
    os.utime(lock, (old, old))
    said.clear()
    acquire(save, report=said.append).release()
    assert said and said[0].endswith(f"(no heartbeat for {STALE_S + 30:.0f} s)"), said

    # a live owner, forced
    lock.write_text(json.dumps({"host": _host(), "pid": os.getppid(), "start": 0, "time": 0}))
    with pytest.raises(LockError):
        acquire(save)
    said.clear()
    forced = acquire(save, force=True, report=said.append)
    assert said[0].endswith("(--eaft-force-lock)") and _owner(lock)["pid"] == os.getpid()
    lock.write_text("{}")  # no longer ours (taken by force elsewhere): release leaves it
    forced.release()
    assert lock.read_text() == "{}"
    assert sorted(p.name for p in save.iterdir()) == [LOCK_NAME]  # no temporaries left
    (tmp_path / "file").write_text("x")  # --save below a regular file: one line, no errno
    with pytest.raises(LockError, match=f"^--save {tmp_path / 'file' / 'run'}: cannot write "
                       f"there \\(Not a directory: {tmp_path / 'file'}"):
        acquire(tmp_path / "file" / "run")


def _files(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_three_real_launches_on_one_save(tiny_inputs, tmp_path):
    """A trains (torchrun, one worker) until it holds the lock and has saved, then is frozen
    (SIGSTOP: alive, and --save stays still). B, launched on the same --save while A lives,
    refuses in one line naming A's host and pid, exit 2 (``eaft-megatron train``, which keeps
    the worker's status; bare torchrun would exit 1), nothing written. A's torchrun and worker
    are killed with SIGKILL (torchrun starts each worker in its own session: both process
    groups). C, the same command as A, takes the stale lock over with a message, resumes from
    A's last checkpoint, trains one iteration (--exit-interval), saves it and removes the lock."""
    save, lock = tmp_path / "run", tmp_path / "run" / LOCK_NAME
    train = ["--load", str(tiny_inputs / "mcore"), "--save", str(save), "--data-path",
             str(tiny_inputs / "data" / "train"), "--micro-batch-size", "1",
             "--global-batch-size", "1", "--lr", "1e-3", "--train-iters", "100000",
             "--lr-decay-iters", "100000", "--save-interval", "10", "--eval-iters", "0",
             "--eval-interval", "100000", "--num-workers", "0"]
    env = subprocess_env()
    with open(tmp_path / "a.log", "w") as out:
        a = subprocess.Popen(torchrun("-m", "eaft_megatron.train", *train,
                                      "--log-dir", str(tmp_path / "log_a")),
                             cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
    worker = None
    try:
        deadline = time.monotonic() + 240
        while not (save / "latest_checkpointed_iteration.txt").is_file() or worker is None:
            assert a.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.2)
            if worker is None and lock.is_file():
                with contextlib.suppress(ValueError, OSError):
                    worker = _owner(lock)["pid"]
        for group in (a.pid, worker):
            os.killpg(group, signal.SIGSTOP)
        before = _files(save)
        owner = _owner(lock)
        assert owner["pid"] == worker and str(tmp_path / "log_a") in owner["argv"]  # A's

        b = subprocess.run([sys.executable, "-m", "eaft_megatron", "train", "--master-addr",
                            "127.0.0.1", "--master-port", str(free_port()), *train,
                            "--log-dir", str(tmp_path / "log_b")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert b.returncode == 2, b.stdout[-2000:] + b.stderr[-3000:]
        assert b.stderr.splitlines() == [
            f"eaft_megatron.train: error: --save {save} is in use by another training job "
            f"(host {owner['host']} pid {worker}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner['time']))}; {lock}): "
            f"wait for it or stop it, or pass --eaft-force-lock if it is gone"], b.stderr
        assert _files(save) == before and not (tmp_path / "log_b").exists()
    finally:
        for group in (worker, a.pid):
            if group is not None:
                os.killpg(group, signal.SIGKILL)
        a.wait()
    assert lock.is_file()  # left behind by the killed job
    last = int((save / "latest_checkpointed_iteration.txt").read_text())

    c = subprocess.run(torchrun("-m", "eaft_megatron.train", *train, "--log-dir",
                                str(tmp_path / "log_c"), "--exit-interval", str(last + 1)),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-3000:]
    took = [x for x in c.stderr.splitlines() if "took over the lock" in x]
    assert len(took) == 1 and re.fullmatch(
        f"eaft_megatron.train: took over the lock of --save {save} from host "
        f"{re.escape(owner['host'])} pid {worker}, started [-0-9: ]+ \\(its process is gone\\)",
        took[0]), took
    assert f"resuming from {save / f'iter_{last:07d}'}" in c.stdout
    assert int((save / "latest_checkpointed_iteration.txt").read_text()) == last + 1
    assert not lock.exists()  # released at the end
