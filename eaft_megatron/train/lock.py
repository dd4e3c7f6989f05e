"""One training job per ``--save``: a lock file that names its owner.

Two jobs writing the same ``--save`` (a requeue while the first still runs, a double submit)
interleave their records in ``metrics.jsonl`` and race for the checkpoint tracker; Megatron-LM
has no guard. Rank 0 of a launch takes ``SAVE/eaft_megatron.lock`` before anything is written
there (:func:`take_run_lock`, right after the trainer's pre-flight) and removes it at exit:

- the file is created atomically (written to a temporary, then hard-linked: it never exists
  half-written) and holds the owner's host, pid, the pid's start time and the command line;
- a lock whose owner is alive makes the second job stop in one line (exit 2), naming the owner;
- a stale lock is taken over, with a message: its owner ran on this host and is gone (or its
  pid now belongs to another process), or it ran on another host (a shared filesystem, where
  the pid cannot be checked) and its heartbeat stopped: the owner touches the file every
  ``HEARTBEAT_S`` seconds, and one untouched for ``STALE_S`` is considered gone (a job killed
  with ``kill -9`` or lost with its node; a requeue on another node then waits at most that);
- ``--eaft-force-lock`` takes it over regardless (when you know the other job is gone).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..paths import _host, _start_time
from .flags import TrainArgError, flag_value

__all__ = ["HEARTBEAT_S", "LOCK_NAME", "STALE_S", "LockError", "RunLock", "add_lock_args",
           "take_run_lock"]

LOCK_NAME = "eaft_megatron.lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0


class LockError(TrainArgError):
    """``--save`` is held by another live job (one line for the user)."""


def add_lock_args(group: Any) -> None:
    group.add_argument("--eaft-force-lock", action="store_true",
                       help=f"take over --save's {LOCK_NAME} even when its owner looks alive "
                            f"(another job training into the same --save); a dead owner's "
                            f"lock is taken over without it")


def _me() -> dict:
    pid = os.getpid()
    return {"host": _host(), "pid": pid, "start": _start_time(pid) or 0,
            "time": time.time(), "argv": sys.argv}


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("time", 0)))
    return f"host {owner.get('host')} pid {owner.get('pid')}, started {started}"


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and only waits to be reaped (a ``kill -9``'d worker whose
    parent is gone too, in a container whose init does not reap): dead, though /proc has it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:].split()[0] in (b"Z", b"X")
    except (OSError, ValueError, IndexError):
        return False


def _why_stale(owner: dict | None, age: float) -> str | None:
    """Why the lock's owner is gone, or None when it may be alive."""
    if owner is None:
        return "unreadable lock file" if age > STALE_S else None
    if owner.get("host") == _host():
        now = _start_time(int(owner.get("pid", -1)))
        if now is None or _zombie(int(owner.get("pid", -1))):
            return "its process is gone"
        if owner.get("start") and now != owner["start"]:
            return "its pid now belongs to another process"
        return None
    if age > STALE_S:
        return f"no heartbeat for {age:.0f} s"
    return None


class RunLock:
    """The lock this process holds; :meth:`release` (also at exit) removes it if still ours."""

    def __init__(self, path: Path, owner: dict) -> None:
        self.path = path
        self.owner = owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="eaft-lock-heartbeat",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _ours(self) -> bool:
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        return all(held.get(k) == self.owner[k] for k in ("host", "pid", "start"))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if os.getpid() == self.owner["pid"] and self._ours():  # not in a forked child
            with contextlib.suppress(OSError):
                self.path.unlink()


def acquire(save: str | os.PathLike, *, force: bool = False, report=None) -> RunLock:
    """Take ``save``'s lock (see the module doc) or raise :class:`LockError`."""
    say = report or (lambda m: print(f"eaft_megatron.train: {m}", file=sys.stderr, flush=True))
    path = Path(save) / LOCK_NAME
    me = _me()
    tmp = path.with_name(f".{LOCK_NAME}.{me['host']}-{me['pid']}-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(me) + "\n")
    except OSError as e:  # below a regular file, read-only, ...
        raise LockError(f"--save {save}: cannot write there ({e.strerror or e}: "
                        f"{e.filename or path.parent})") from None
    try:
        for _ in range(3):  # link (atomic, fails if present); else judge the owner, replace
            try:
                os.link(tmp, path)
                return RunLock(path, me)
            except FileExistsError:
                pass
            try:
                age = time.time() - path.stat().st_mtime
                owner = json.loads(path.read_text())
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except (OSError, ValueError):
                owner = None
            why = "--eaft-force-lock" if force else _why_stale(owner, age)
            if why is None:
                raise LockError(
                    f"--save {save} is in use by another training job ({_describe(owner)}; "
                    f"{path}): wait for it or stop it, or pass --eaft-force-lock if it is gone")
            os.replace(tmp, path)
            lock = RunLock(path, me)
            was = _describe(owner) if owner else "unknown owner"
            say(f"took over the lock of --save {save} from {was} ({why})")
            return lock
        raise LockError(f"--save {save}: could not take {path} (other jobs keep taking it)")
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def take_run_lock(argv: list[str]) -> RunLock | None:
    """On global rank 0 of a launch with ``--save``: :func:`acquire` it (``--eaft-force-lock``
    in ``argv`` forces). Other ranks and runs without ``--save`` take nothing."""
    save = flag_value(argv, "--save")
    if save is None or os.environ.get("RANK", "0") != "0":
        return None
    return acquire(save, force="--eaft-force-lock" in argv)
