"""A Python that has already imported torch, megatron and the trainer, and forks the tests' runs.

Almost all of a test launch's cost is start-up: every trainer rank imports torch, megatron-core,
megatron's training package and transformers (~6 of its ~8 CPU seconds), and torchrun's parent
imports torch again. The zygote pays that once per pytest session. ``launch(module, args,
nproc=N, ...)`` asks it to fork ``N`` processes that each run ``python -m module args`` as a
torchrun worker would (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` set; a failed rank makes the launcher stop the others, as
torchrun does). The ranks are real processes in a real gloo group running the real entry point
(``runpy``, ``__name__ == "__main__"``); only the interpreter start-up is shared.

What torchrun itself does (its exit status, its failure summary, signals reaching the workers
through its agent) is not what these launches test: tests of those keep launching real torchrun
(``tests.support.launch.torchrun``).

Fork safety: the zygote imports modules and runs nothing, so it holds one thread when it forks
(checked at start: a module that starts a thread at import makes the zygote refuse to serve and
the tests fall back to torchrun).

Protocol (a Unix socket in a private temporary directory): one JSON line per request
``{"module", "args", "nproc", "env", "cwd", "stdout", "stderr", "port", "distributed"}`` (and
optionally ``"addr"``, the ``MASTER_ADDR``; 127.0.0.1 without); the handler answers ``{"pid":
...}`` (its process group, for killing on timeout), then ``{"returncode": ...}`` when the ranks
are done. SIGTERM and SIGINT sent to that group reach the ranks only (the handler blocks them
and reports the ranks' status); a client that goes away (its end of the socket closed) takes the
group with it. Clients: :class:`Zygote` (pytest's side) and :mod:`tests.support.zygote_run` (the
torchrun launches the package makes itself, from inside a launch: each connection gets its own
handler, so launches nest).

    python -m tests.support.zygote SOCKET PARENT_PID     # serve (started by ``Zygote()``)
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from eaft_megatron.compat.processes import die_with_parent, thread_count

ROOT = Path(__file__).resolve().parents[2]


class ChildExit(BaseException):
    """Raised in a forked rank to unwind to the top and leave through the normal interpreter
    shutdown (atexit handlers, non-daemon threads joined, streams flushed)."""

    def __init__(self, code: int):
        self.code = code


def _run_rank(module: str, args: list[str], env: dict, cwd: str, stdout: str,
              stderr: str, parent: int) -> None:
    """In the forked rank: become ``python -m module args`` and never return."""
    import runpy

    die_with_parent(parent)  # (every process here: a killed pytest leaves no orphan)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for target, path in ((1, stdout), (2, stderr)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)  # blocked in the launcher
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as the interpreter would: traceback, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    raise ChildExit(code)


#: what a client may send the launch's process group (``tests.support.zygote_run`` forwards its
#: own): the ranks get them, the launcher blocks them and goes on to report the ranks' status
_FORWARDED = {signal.SIGINT, signal.SIGTERM}


def _next_exit(conn: socket.socket, pidfds: dict[int, int]) -> tuple[int, int] | None:
    """``(pid, wait status)`` of the next rank to exit, or None once the client has gone (its
    end of the socket closed: killed, or past its timeout)."""
    while True:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            os.close(pidfds.pop(pid))
            return pid, status
        ready, _, _ = select.select([conn, *pidfds.values()], [], [])
        if conn in ready and not conn.recv(4096):
            return None


def _handle(conn: socket.socket, parent: int) -> None:
    """In a forked handler: fork the ranks of one request, wait, answer."""
    die_with_parent(parent)
    os.setsid()  # one process group: the client kills it whole on timeout
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    stream = conn.makefile("rw")
    req = json.loads(stream.readline())
    stream.write(json.dumps({"pid": os.getpid()}) + "\n")
    stream.flush()
    nproc, distributed = int(req["nproc"]), bool(req["distributed"])
    env = dict(req["env"])
    if distributed:
        env.update(MASTER_ADDR=req.get("addr", "127.0.0.1"), MASTER_PORT=str(req["port"]),
                   WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
                   TORCHELASTIC_RUN_ID="zygote")
    pids, me = {}, os.getpid()
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            stream.close()
            conn.close()
            rank_env = dict(env)
            if distributed:
                rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank))
            _run_rank(req["module"], req["args"], rank_env, req["cwd"], req["stdout"],
                      req["stderr"], me)
        pids[pid] = rank
    pidfds = {pid: os.pidfd_open(pid) for pid in pids}
    returncode = 0
    while pids:
        done = _next_exit(conn, pidfds)
        if done is None:  # nobody waits for the answer: the launch ends with its client
            os.killpg(0, signal.SIGKILL)  # (this launcher included)
            os._exit(1)
        pid, status = done
        pids.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and returncode == 0:
            returncode = code
            for other in pids:  # as torchrun: one failed worker stops the group
                try:
                    os.kill(other, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while pids and time.monotonic() < deadline:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid:
                    pids.pop(pid, None)
                    os.close(pidfds.pop(pid))
                else:
                    time.sleep(0.05)
            for other in pids:
                os.kill(other, signal.SIGKILL)
    stream.write(json.dumps({"returncode": returncode}) + "\n")
    stream.flush()


def serve(path: str, parent: int) -> None:
    die_with_parent(parent)
    import tests.support.preload  # noqa: F401 - the imports every child skips
    threads = thread_count()
    if threads != 1:
        print(json.dumps({"error": f"{threads} threads after the imports: forking is unsafe"}),
              flush=True)
        return
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)

    def stop(signum, frame):
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    print(json.dumps({"ready": True}), flush=True)
    me = os.getpid()
    try:
        while True:
            conn, _ = server.accept()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                server.close()
                _handle(conn, me)
                raise ChildExit(0)
            conn.close()
            while True:  # reap finished handlers (their CPU time adds up to ours, and pytest's)
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        break
                except ChildProcessError:
                    break
    except _Stop:
        server.close()
        while True:
            try:
                os.wait()
            except ChildProcessError:
                break


class _Stop(Exception):
    pass


def request(path: str, launch: dict) -> tuple[socket.socket, Any, int]:
    """Send one request (the protocol above) to the zygote at ``path``: the connection, its
    stream (the ``{"returncode": ...}`` line comes next) and the launch's process group."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    stream = conn.makefile("rw")
    stream.write(json.dumps(launch) + "\n")
    stream.flush()
    return conn, stream, int(json.loads(stream.readline())["pid"])


class Zygote:
    """The client side: construct once (starts the zygote), then ``launch(...)`` per run."""

    def __init__(self, env: dict):
        self._dir = tempfile.mkdtemp(prefix="eaft-zygote-")
        self.path = os.path.join(self._dir, "socket")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.zygote", self.path, str(os.getpid())],
            cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        status = json.loads(line) if line.strip() else {"error": "the zygote exited"}
        self.error = status.get("error")

    @property
    def ok(self) -> bool:
        return self.error is None and self.proc.poll() is None

    def launch(self, module: str, args: list[str], *, nproc: int, env: dict, cwd: str,
               stdout: str, stderr: str, port: int, timeout: float,
               distributed: bool = True) -> int:
        conn, stream, pid = request(self.path, dict(
            module=module, args=list(args), nproc=nproc, env=env, cwd=str(cwd), stdout=stdout,
            stderr=stderr, port=port, distributed=distributed))
        conn.settimeout(timeout)
        try:
            answer = stream.readline()
        except (socket.timeout, TimeoutError):
            os.killpg(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired([module, *args], timeout) from None
        finally:
            conn.close()
        if not answer:
            raise RuntimeError(f"the zygote's launcher {pid} died without an answer")
        return int(json.loads(answer)["returncode"])

    def close(self) -> None:
        """Stop serving; the zygote reaps its finished launchers first, so that their CPU time
        counts in pytest's (``/usr/bin/time``)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.rmdir(self._dir)


if __name__ == "__main__":
    try:
        serve(sys.argv[1], int(sys.argv[2]))
    except ChildExit as done:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.exit(done.code)
