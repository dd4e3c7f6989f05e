"""Every process the tests start: gloo groups spawned in-process, trainer and command launches.

``spawn(fn, world_size, *args)`` starts ``world_size`` processes, initialises a gloo group in each,
calls ``fn(rank, world_size, *args)`` and returns the per-rank return values (must be
picklable). The processes are forked from a fork server that imported torch and megatron once
(:mod:`tests.support.preload`) and ran nothing, so no OpenMP state; with ``env`` they are fresh
interpreters instead, for what must be in the environment at start-up. A failure or timeout in
any rank fails the test with that rank's traceback. Group several checks into one ``fn``.

``run_module(module, *args, nproc=N)`` runs ``python -m module`` (one process, or ``N`` ranks as
torchrun starts them) forked from the session's zygote (:mod:`tests.support.zygote`), which saves
each process ~5 s of imports; ``run_train(log_dir, *args, nproc=...)`` runs the trainer that way
(real gloo groups, Megatron's own loop) and reads back its ``metrics.jsonl``. ``torchrun(...)`` is
the command line of the tests that launch real torchrun (its exit status, its signal handling,
kill -9 of a job); ``subprocess_env()`` the environment of every child. ``EAFT_TESTS_TORCHRUN=1``
makes every launch a real torchrun / fresh interpreter again (slower; same tests).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import queue
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from eaft_megatron.compat.processes import free_port  # the package's one; tests import it here

ROOT = Path(__file__).resolve().parents[2]


def _worker(rank, world_size, port, fn, args, env, results):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    from eaft_megatron.compat.lazy_compile import defer_torch_compile

    defer_torch_compile()  # as the command-line entry points do, before megatron's import
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # Plain pickle (not the queue's shared-memory reducer): tensors shared through file
        # descriptors vanish when this process exits before the parent reads them.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context(fresh: bool):
    """Fresh interpreters (``spawn``) when the children need an environment at start-up or real
    launches are asked for (``EAFT_TESTS_TORCHRUN=1``); otherwise children forked from the
    session's fork server, which imported :mod:`tests.support.preload` once."""
    if fresh or os.environ.get("EAFT_TESTS_TORCHRUN") == "1":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.support.preload"])
    return ctx


def spawn(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600, env=None
) -> list[Any]:
    ctx = _context(fresh=bool(env))
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(rank, world_size, port, fn, args, dict(env or {}), results)
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue.Empty:
                errors.append(f"timed out after {timeout}s waiting for ranks")
                break
            if ok:
                outputs[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # peers may now block in a collective: stop waiting
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [outputs[r] for r in range(world_size)]


def subprocess_env(**extra: str) -> dict:
    """The environment of every child the tests start: this checkout importable, one thread per
    process, no warnings noise."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra,
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def torchrun(*target: str, nproc: int = 1) -> list[str]:
    """``python -m torch.distributed.run`` on 127.0.0.1 at a free port, then ``target``
    (e.g. ``"-m", "eaft_megatron.train", ...``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *target]


@dataclass
class Run:
    returncode: int
    output: str
    records: list[dict]

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind]

    def train(self) -> dict[int, dict]:
        return {r["iteration"]: r for r in self.of("train")}


def build_tiny(root: Path) -> dict:
    """``fixtures.py``'s tiny Qwen3 (HF + converted checkpoint) and data, built in a child."""
    run_module("tests.support.fixtures", root, check=True)
    return tiny_paths(root)


def tiny_paths(root: Path) -> dict:
    """Where ``fixtures.build_all`` put its pieces under ``root``."""
    return dict(root=root, hf=root / "hf_model", ckpt=root / "mcore", data=root / "data" / "train")


def copy_tiny(built: Path, root: Path) -> dict:
    """A private copy under ``root`` of the tiny inputs built once per session (``tiny_inputs``
    in ``tests/conftest.py``): each test file writes its runs next to its own copy."""
    shutil.copytree(built, root, dirs_exist_ok=True)
    return tiny_paths(root)


_ZYGOTE = None


def zygote():
    """The session's :class:`tests.support.zygote.Zygote` (started on first use), or None when
    ``EAFT_TESTS_TORCHRUN=1`` asks for real torchrun launches everywhere or it cannot serve."""
    global _ZYGOTE
    if os.environ.get("EAFT_TESTS_TORCHRUN") == "1":
        return None
    if _ZYGOTE is None:
        import atexit

        from tests.support.zygote import Zygote

        _ZYGOTE = Zygote(subprocess_env())
        atexit.register(_ZYGOTE.close)
        if not _ZYGOTE.ok:
            print(f"tests: zygote unavailable ({_ZYGOTE.error}); launching torchrun",
                  file=sys.stderr)
    return _ZYGOTE if _ZYGOTE.ok else None


def zygote_env() -> dict:
    """The environment that sends the package's own torchrun launches (the demo's trainer,
    ``EAFT_TORCHRUN``) to the session's zygote through :mod:`tests.support.zygote_run`; empty
    when there is no zygote (``EAFT_TESTS_TORCHRUN=1``: real torchrun)."""
    server = zygote()
    if server is None:
        return {}
    return dict(EAFT_TORCHRUN=f"{shlex.quote(sys.executable)} -m tests.support.zygote_run",
                EAFT_ZYGOTE_SOCKET=server.path)


def run_module(module: str, *args: str, nproc: int | None = None, cwd: Path = ROOT,
               timeout: float = 300, check: bool = False,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` (``nproc=None``), or ``N`` ranks of it as torchrun would start
    them (``nproc=N``), forked from the session's zygote; ``subprocess.run`` / torchrun when
    there is none; the torchrun launches the process makes itself (the demo's trainer) are
    forked from the zygote too (:func:`zygote_env`). Returns the exit status, stdout and stderr
    (ranks' output interleaved); ``check=True`` raises on a non-zero status, with the output.
    ``env`` adds to :func:`subprocess_env`. Tests of torchrun's own behaviour (its exit status
    and summary, signals through its agent) launch ``torchrun(...)`` themselves."""
    env = subprocess_env(**(env or {}))
    server = zygote()
    if server is None:
        cmd = [sys.executable, "-m", module, *map(str, args)] if nproc is None else \
            torchrun("-m", module, *map(str, args), nproc=nproc)
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    else:
        env = {**zygote_env(), **env}
        proc = _zygote_run(server, module, args, nproc=nproc, env=env, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m {module} {' '.join(map(str, args))} exited "
                             f"{proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _zygote_run(server, module, args, *, nproc, env, cwd, timeout):
    import tempfile

    with tempfile.TemporaryDirectory(prefix="eaft-launch-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        code = server.launch(module, [str(a) for a in args], nproc=nproc or 1, env=env,
                             cwd=str(cwd), stdout=str(out), stderr=str(err), port=free_port(),
                             timeout=timeout, distributed=nproc is not None)
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        return subprocess.CompletedProcess([module, *args], code, read(out), read(err))


def run_train(log_dir: Path, *args: str, nproc: int = 1, timeout: float = 300) -> Run:
    """Launch the trainer (``nproc`` ranks, see :func:`run_module`); ``log_dir`` is passed as
    ``--log-dir`` (metrics.jsonl)."""
    proc = run_module("eaft_megatron.train", "--log-dir", str(log_dir), "--num-workers", "0",
                      *args, nproc=nproc, timeout=timeout)
    metrics = Path(log_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.is_file() else []
    return Run(proc.returncode, proc.stdout + proc.stderr, records)


def check(run: Run) -> Run:
    assert run.returncode == 0, run.output[-6000:]
    return run
