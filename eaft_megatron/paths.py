"""Filesystem safety for commands that write outputs (``convert``, ``preprocess``).

Four rules, one place:

1. **Outputs never overlap inputs.** :func:`check_output` refuses an output that is, is inside,
   or contains any input (after resolving symlinks; bind mounts and hard-linked directories are
   caught by comparing device and inode), with or without ``--force``.
2. **Outputs appear atomically.** :func:`atomic_output` yields a temporary sibling
   (``.<name>.tmp-<owner>``) that replaces ``out`` only when the block succeeds; on any error
   or interruption it is removed, so ``out`` is either the old content or the complete new one.
3. **Leftovers of killed runs are cleaned by the next run.** The temporary name records its
   owner (host, pid and the pid's start time, so a recycled pid is not mistaken for the
   owner). :func:`atomic_output` removes, and reports, leftovers of ``out`` whose owner is
   dead; if the owner is alive (a concurrent run writing the same output) it refuses instead.
   A run killed between the two renames of a ``--force`` replacement leaves no ``out``: the
   next run puts the killed run's complete new output in place (or the old one back).
4. **SIGTERM cleans up like Ctrl-C.** Inside :func:`interruptible`, SIGINT and SIGTERM raise
   :class:`Interrupted` (a ``KeyboardInterrupt``), so ``finally`` blocks and
   :func:`atomic_output`'s cleanup run; the command then exits with ``128 + signal``.

Typical command::

    from eaft_megatron.paths import atomic_output, check_output, interruptible

    with interruptible():
        check_output(out, inputs={"--hf": hf_dir}, force=force)   # early: before any work
        with atomic_output(out, inputs={"--hf": hf_dir}, force=force) as tmp:
            write_everything_into(tmp)   # a new directory (directory=False: a file path)

Errors are :class:`UnsafePathError` (a ``ValueError``) with a one-line message for the user.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

__all__ = [
    "Interrupted",
    "UnsafePathError",
    "atomic_output",
    "check_output",
    "interruptible",
    "overlaps",
    "remove_stale_temps",
]

PathLike = str | os.PathLike
Inputs = Mapping[str, PathLike | None] | Iterable[PathLike | None]


class UnsafePathError(ValueError):
    """An output that may not be written (overlaps an input, exists, is being written...)."""


class Interrupted(KeyboardInterrupt):
    """Raised by :func:`interruptible`'s handler for SIGINT / SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _say(message: str) -> None:
    print(f"eaft-megatron: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# 1. Overlap


def _contains(outer: Path, inner: Path) -> bool:
    """``inner`` is ``outer`` or lies inside it (both resolved; existing ancestors compared by
    device + inode too, for bind mounts and case-insensitive filesystems)."""
    if inner == outer or outer in inner.parents:
        return True
    try:
        key = (outer.stat().st_dev, outer.stat().st_ino)
    except OSError:
        return False
    for p in (inner, *inner.parents):
        try:
            st = p.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == key:
            return True
    return False


def overlaps(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` are the same path or one contains the other (symlinks resolved)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return _contains(a, b) or _contains(b, a)


def _named_inputs(inputs: Inputs) -> list[tuple[str, Path]]:
    items = inputs.items() if isinstance(inputs, Mapping) else ((str(p), p) for p in inputs)
    return [(label, Path(p)) for label, p in items if p is not None]


def check_output(out: PathLike, *, inputs: Inputs = (), force: bool = False,
                 directory: bool = True) -> Path:
    """Refuse, before any work, an output that may not be written; return it resolved.

    ``inputs`` maps a label for messages (``"--hf"``) to each input path (``None`` entries are
    skipped; a plain iterable of paths works too). Refused: ``out`` equal to, inside or
    containing an input (whatever ``force`` says); ``out`` existing as the wrong kind (a file
    where a directory is wanted or the reverse); an existing non-empty directory / existing file
    without ``force``.
    """
    resolved = Path(out).resolve()
    for label, path in _named_inputs(inputs):
        src = path.resolve()
        if _contains(src, resolved):
            what = "is" if src == resolved else "is inside"
            raise UnsafePathError(f"output {out} {what} the input {label} {path}: choose an "
                                  f"output outside the inputs (refused even with --force)")
        if _contains(resolved, src):
            raise UnsafePathError(f"output {out} contains the input {label} {path}: writing it "
                                  f"would destroy the input (refused even with --force)")
    if directory:
        if resolved.exists() and not resolved.is_dir():
            raise UnsafePathError(f"output {out} exists and is not a directory")
        if resolved.is_dir() and any(resolved.iterdir()) and not force:
            raise UnsafePathError(f"output directory {out} exists and is not empty (use --force)")
    else:
        if resolved.is_dir():
            raise UnsafePathError(f"output {out} is a directory, a file is expected")
        if resolved.exists() and not force:
            raise UnsafePathError(f"output {out} exists (use --force)")
    return resolved


# --------------------------------------------------------------------------------------------
# 2./3. Temporary outputs that name their owner


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


def _start_time(pid: int) -> int | None:
    """A number fixed for the lifetime of process ``pid`` (its start time), None if no such
    process. Linux: clock ticks since boot from /proc; elsewhere psutil (milliseconds)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The command name (field 2) may contain spaces and parentheses: split after it.
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, ValueError, IndexError):
        return None
    import psutil

    try:
        return int(psutil.Process(pid).create_time() * 1000)
    except psutil.Error:
        return None


_OWNED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-"
                    r"(?P<start>\d+)-[0-9a-f]{8}$")


def _owned_name(out: Path, kind: str) -> Path:
    owner = f"{_host()}-{os.getpid()}-{_start_time(os.getpid()) or 0}"
    return out.parent / f".{out.name}.{kind}-{owner}-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temps(out: PathLike, *, report=_say) -> list[Path]:
    """Remove the temporaries of ``out`` left by runs that were killed; return them.

    Only siblings named by :func:`atomic_output` for this very ``out`` are considered. One whose
    owner runs on this host and is still alive (same pid, same start time) belongs to a
    concurrent run: :class:`UnsafePathError`. One from another host (a shared filesystem) cannot
    be checked: also refused, with the path to delete by hand if no such run exists.
    """
    out = Path(out).resolve()
    if not out.parent.is_dir():
        return []
    stale: list[tuple[Path, re.Match]] = []
    for p in sorted(out.parent.iterdir()):
        m = _OWNED.match(p.name)
        if not m or m["name"] != out.name:
            continue
        pid, start = int(m["pid"]), int(m["start"])
        if m["host"] != _host():
            raise UnsafePathError(f"{p} belongs to a run on host {m['host']} (pid {pid}) that may "
                                  f"still be writing {out}; delete it if that run is gone")
        now = _start_time(pid)
        if pid == os.getpid() or (now is not None and (now == start or not start)):
            raise UnsafePathError(f"another run (pid {pid}) is writing {out} right now "
                                  f"(temporary {p.name}); wait for it or stop it")
        stale.append((p, m))
    _finish_interrupted_replacement(out, stale, report)
    removed = []
    for p, m in stale:
        if p.exists() or p.is_symlink():
            _remove(p)
            removed.append(p)
            report(f"removed {p}, left by an interrupted run (pid {m['pid']})")
    return removed


def _finish_interrupted_replacement(out: Path, stale: list[tuple[Path, re.Match]],
                                    report) -> None:
    """A run killed between the two renames of a replacement (``out`` -> ``.old``, complete
    ``.tmp`` -> ``out``) leaves no ``out``: put the complete new content in place (its ``.tmp``
    was finished before the first rename), or the old content back if that is all there is."""
    if out.exists() or out.is_symlink():
        return
    owner = lambda m: (m["host"], m["pid"], m["start"])  # noqa: E731
    for old, m in stale:
        if m["kind"] != "old":
            continue
        done = [p for p, n in stale if n["kind"] == "tmp" and owner(n) == owner(m)]
        keep = done[0] if done else old
        keep.rename(out)
        what = "its complete new output" if done else "the previous output"
        report(f"{out} was being replaced when a run was killed (pid {m['pid']}): "
               f"restored {what} from {keep.name}")
        return


@contextlib.contextmanager
def atomic_output(out: PathLike, *, inputs: Inputs = (), force: bool = False,
                  directory: bool = True, report=_say) -> Iterator[Path]:
    """Yield a temporary path (a new empty directory, or with ``directory=False`` a file path
    not yet created) that becomes ``out`` only if the block completes.

    Checks ``out`` with :func:`check_output` and removes stale temporaries of ``out``
    (:func:`remove_stale_temps`) first. On success the temporary is renamed to ``out``; an
    existing ``out`` (allowed by ``force``) is replaced only then, never before the new content
    is complete. On an exception the temporary is removed; on an interruption (Ctrl-C, or SIGTERM
    under :func:`interruptible`) that is also reported.
    """
    out = check_output(out, inputs=inputs, force=force, directory=directory)
    remove_stale_temps(out, report=report)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _owned_name(out, "tmp")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        check_output(out, force=force, directory=directory)  # nothing appeared meanwhile
        if not directory:
            os.replace(tmp, out)
        elif out.exists():
            old = _owned_name(out, "old")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)  # the previous output back, never neither
                raise
            _remove(old)
        else:
            tmp.rename(out)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, KeyboardInterrupt) or _FIRED:
            why = e.name if isinstance(e, Interrupted) else \
                signal.Signals(_FIRED[0]).name if _FIRED else "SIGINT"
            report(f"interrupted ({why}): removed the unfinished output {tmp}")
        raise


# --------------------------------------------------------------------------------------------
# 4. Signals


@contextlib.contextmanager
def interruptible(signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Turn the first of ``signals`` into :class:`Interrupted` in the main thread (so cleanup
    code runs), ignore repeats while that cleanup runs, restore the old handlers on exit.
    Outside the main thread it does nothing (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _FIRED.clear()

    def handler(signum, _frame):
        if not _FIRED:
            _FIRED.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    # A process may start with these signals blocked (the mask is inherited through fork and
    # exec): they would stay pending and the run would never be interrupted.
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, previous) & set(previous)
    try:
        yield
    except BaseException as e:
        # Libraries may catch the Interrupted and raise something else (torch's distributed
        # checkpointing turns what its write workers raise into "RuntimeError: Worker
        # failure"): after a signal, whatever comes out is that interruption.
        if _FIRED and not isinstance(e, KeyboardInterrupt):
            raise Interrupted(_FIRED[0]) from e
        raise
    finally:
        _FIRED.clear()
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        for s, h in previous.items():
            signal.signal(s, h)


_FIRED: list[int] = []  # the signal interruptible() turned into Interrupted, while inside it
