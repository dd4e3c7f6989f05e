"""Child processes that never outlive their parent.

What megatron-core 0.19.2 starts when it saves a torch_dist checkpoint (read in
``megatron/core/dist_checkpointing/strategies``): even a synchronous ``dist_checkpointing.save``
goes through ``FileSystemWriterAsync.prepare_write_data``, which calls
``filesystem_async.get_write_results_queue()``: ``mp.get_context("spawn").Manager().Queue()``.
That is a **spawned manager server** (a fresh interpreter that re-imports the parent's
``__main__``, for the trainer torch + megatron, ~0.5 GB), kept for the life of the process in a
module global, plus -- because spawn needs one -- the multiprocessing **resource tracker**
(another interpreter). The manager never looks at its parent: after ``kill -9`` of the trainer
or converter it runs on, re-parented to init, and keeps the tracker alive (the tracker exits
only when every holder of its pipe is gone). With ``--async-save`` megatron also forks a writer
per save (``AsyncCaller``) or spawns a persistent one (``PersistentAsyncCaller``).

Remedies, one per situation:

- :func:`in_process_checkpoint_writes` (a context): synchronous saves get an in-process
  ``queue.Queue`` instead of the manager, so no process is started at all (the writes already run
  in threads of the calling process). Conversion uses it.
- :func:`contain_child_processes` (call once at start-up, e.g. in the trainer): without async
  saves it installs the in-process queue for good; with them, every child started afterwards
  from the main thread is killed by the kernel when this process dies (``PR_SET_PDEATHSIG``):
  forked children through ``os.register_at_fork``, spawned ones (the manager, the persistent
  writer, spawn DataLoader workers) through a prefix to the spawn command line.
  The resource tracker then exits by itself.
- :func:`die_with_parent` for code that starts its own workers (call it first in the child).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator

__all__ = ["contain_child_processes", "die_with_parent", "free_port",
           "in_process_checkpoint_writes", "thread_count"]

_PR_SET_PDEATHSIG = 1
_LINUX = sys.platform.startswith("linux")


def die_with_parent(parent_pid: int) -> None:
    """In a child process: be killed (SIGKILL) when the parent dies; exit at once if it already
    has. The kernel ties this to the *thread* that started the child: start children from a
    thread that lives as long as the parent (the main thread). Linux only (elsewhere only the
    "already dead" check)."""
    if _LINUX:
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


@contextlib.contextmanager
def in_process_checkpoint_writes() -> Iterator[None]:
    """Synchronous torch_dist saves inside the block start no process (see the module doc).
    Not for asynchronous saves: their writer runs in another process and needs the manager."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


# -- contain_child_processes --------------------------------------------------------------------

_installed = False
_fork_state = {"from_main": False, "parent": 0}


def _before_fork() -> None:
    _fork_state.update(from_main=threading.current_thread() is threading.main_thread(),
                       parent=os.getpid())


def _after_fork_in_child() -> None:
    if _fork_state["from_main"]:
        die_with_parent(_fork_state["parent"])


def _spawn_prefix() -> str:
    """Python run by a spawned child before multiprocessing's own bootstrap."""
    return (f"import ctypes, os; ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, {signal.SIGKILL}); "
            f"os.getppid() == {os.getpid()} or os._exit(1); ")


def _patch_spawn_command_line() -> None:
    import multiprocessing.spawn as spawn

    original = spawn.get_command_line

    def get_command_line(**kwds):
        argv = original(**kwds)
        if threading.current_thread() is threading.main_thread() and "-c" in argv:
            i = argv.index("-c") + 1
            argv = [*argv[:i], _spawn_prefix() + argv[i], *argv[i + 1:]]
        return argv

    get_command_line.eaft_original = original
    spawn.get_command_line = get_command_line


def contain_child_processes(*, async_save: bool = False) -> None:
    """Make sure no child process outlives this one; call once at start-up, before any
    checkpoint is saved (idempotent).

    ``async_save=False`` (the default; Megatron's ``--async-save`` not used): synchronous saves
    write from this process and start no manager at all. ``async_save=True`` (or in any case,
    for other children): on Linux every child started from the main thread afterwards gets
    ``PR_SET_PDEATHSIG=SIGKILL``, whether forked or spawned.
    """
    global _installed
    if not async_save:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = queue.Queue()
    if _installed or not _LINUX:
        return
    _installed = True
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _patch_spawn_command_line()


def thread_count() -> int:
    """Threads of this process (Linux ``/proc/self/task``), 0 where unknown. fork is safe only
    at 1: a child gets a copy of the forking thread alone, with whatever locks others held."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (``--master-port`` of a torchrun launch), taken
    below the kernel's ephemeral range (``ip_local_port_range``) where one exists.

    A port from ``bind(0)`` is an ephemeral one: between this call and the launch's store binding
    it, any outgoing connection or ``bind(0)`` on the machine (another job's gloo pairs, which
    open dozens) may be handed the same port. Below the range only another explicit choice can
    take it: a random one of ~20000 ports, checked free by binding it here."""
    import random
    import socket

    low = _ephemeral_low()
    candidates = random.sample(range(10000, low), min(64, low - 10000)) if low > 10000 else []
    for port in [*candidates, 0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux), 0 if unknown."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
