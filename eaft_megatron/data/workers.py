"""Worker processes that fail fast: a killed worker stops the run, naming the work it held.

    with WorkerPool(encode, (tokenizer, fmt), workers=8) as pool:
        pool.submit(chunk, where="train.jsonl lines 1-256")
        result = pool.next_result()          # results come back in submission order

``multiprocessing.Pool`` replaces a worker that dies (e.g. SIGKILL from the out-of-memory
killer) but loses its task, and the parent waits for that result forever. Here every worker has
its own task queue and result pipe, and the parent waits on the result pipes *and* the workers'
process sentinels, so a death is seen at once and raised as :class:`WorkerDied` naming the item
the worker was processing (a worker takes its items in order, so that is its oldest unanswered
one). Results that arrive early are kept until their turn, so no worker waits on the order.

Workers never outlive the parent: on Linux the kernel kills them when it dies
(``PR_SET_PDEATHSIG``); elsewhere a worker waiting for work notices within a second that its
parent changed. They ignore SIGINT and SIGTERM (the parent handles them and stops the workers).

``fork`` is used where available: the state (a loaded tokenizer) is inherited, not pickled.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import traceback
import warnings
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Callable

from ..compat.processes import die_with_parent


class WorkerDied(RuntimeError):
    """A worker process ended or failed while it held work."""


def _worker_main(fn: Callable, state: tuple, tasks: Any, results: Any, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    # Ctrl-C and a SIGTERM sent to the whole group (timeout, Slurm) are the parent's to handle:
    # it cleans up and stops the workers; a worker dying first would be reported as a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker
    while True:
        try:
            item = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if item is None:
            return
        try:
            results.send((True, fn(*state, item)))
        except Exception:  # noqa: BLE001 - a bug in fn: report it with the item's location
            results.send((False, traceback.format_exc(limit=-3)))


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (the out-of-memory killer sends it)" if code == -signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


class WorkerPool:
    """``workers`` processes running ``fn(*state, item)``; see the module docstring."""

    def __init__(self, fn: Callable, state: tuple, *, workers: int) -> None:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        self._tasks = [ctx.Queue() for _ in range(workers)]
        pipes = [ctx.Pipe(duplex=False) for _ in range(workers)]
        self._results = [reader for reader, _ in pipes]
        self._procs = [ctx.Process(target=_worker_main, daemon=True, name=f"eaft-worker-{i}",
                                   args=(fn, state, self._tasks[i], writer, os.getpid()))
                       for i, (_, writer) in enumerate(pipes)]
        with warnings.catch_warnings():
            # Python warns about fork() in a process with threads (torch, if imported, starts
            # one idle native thread); the workers only run fn, never those threads' code
            warnings.filterwarnings("ignore", "This process .* is multi-threaded",
                                    DeprecationWarning)
            for p in self._procs:
                p.start()
        for _, writer in pipes:
            writer.close()  # the workers hold the write ends
        self._held: list[deque] = [deque() for _ in range(workers)]  # (seq, where) per worker
        self._ready: dict[int, Any] = {}
        self._submitted = self._returned = 0
        self._closed = False

    def submit(self, item: Any, *, where: str) -> None:
        """Queue ``item`` (``where`` names it in errors) on the least busy worker."""
        w = min(range(len(self._procs)), key=lambda i: len(self._held[i]))
        self._held[w].append((self._submitted, where))
        self._tasks[w].put(item)
        self._submitted += 1

    def __len__(self) -> int:
        return len(self._procs)

    def next_result(self) -> Any:
        """The result of the oldest item not yet returned (raises :class:`WorkerDied`)."""
        seq = self._returned
        while seq not in self._ready:
            sentinels = {p.sentinel: w for w, p in enumerate(self._procs)}
            readers = {r: w for w, r in enumerate(self._results) if self._held[w]}
            for ready in wait([*readers, *sentinels]):
                if ready in readers:
                    self._receive(readers[ready])
                elif not self._results[sentinels[ready]].poll():  # died with nothing unsent
                    self._died(sentinels[ready])
        self._returned += 1
        return self._ready.pop(seq)

    def _receive(self, w: int) -> None:
        try:
            ok, payload = self._results[w].recv()
        except EOFError:
            self._died(w)
        seq, where = self._held[w].popleft()
        if not ok:
            raise WorkerDied(f"worker {w} failed on {where}:\n{payload}")
        self._ready[seq] = payload

    def _died(self, w: int) -> None:
        proc = self._procs[w]
        proc.join(timeout=5)
        what = f"while processing {self._held[w][0][1]}" if self._held[w] else "while idle"
        raise WorkerDied(f"worker process {w} (pid {proc.pid}) {_exit_reason(proc.exitcode)} "
                         f"{what}")

    def close(self, *, graceful: bool = True) -> None:
        """Stop the workers: ask them to exit (``graceful``), kill what is left (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if graceful:
            for tasks in self._tasks:
                tasks.put(None)
            for p in self._procs:
                p.join(timeout=5)
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join()
        for tasks in self._tasks:
            tasks.cancel_join_thread()  # never block exit on items a dead worker did not read
            tasks.close()
        for reader in self._results:
            reader.close()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(graceful=exc_type is None)
