"""Every process the tests start: gloo groups spawned in-process, and torchrun launches.

``spawn(fn, world_size, *args)`` starts ``world_size`` processes (spawn start method, so no
forked OpenMP state), initialises a gloo group in each, calls ``fn(rank, world_size, *args)``
and returns the per-rank return values (must be picklable). A failure or timeout in any rank
fails the test with that rank's traceback. Each spawn costs seconds of imports: group several
checks into one ``fn``.

``run_train(log_dir, *args, nproc=...)`` runs ``python -m eaft_megatron.train`` under torchrun
(real gloo groups, Megatron's own loop) and reads back its ``metrics.jsonl``; ``torchrun(...)`` is
the command line every torchrun launch in the tests uses; ``subprocess_env()`` the environment of
every child.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import queue
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


def spawn(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600, env=None
) -> list[Any]:
    ctx = mp.get_context("spawn")
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
    subprocess.run([sys.executable, "-m", "tests.support.fixtures", str(root)], cwd=ROOT,
                   env=subprocess_env(), check=True, capture_output=True, timeout=300)
    return tiny_paths(root)


def tiny_paths(root: Path) -> dict:
    """Where ``fixtures.build_all`` put its pieces under ``root``."""
    return dict(root=root, hf=root / "hf_model", ckpt=root / "mcore", data=root / "data" / "train")


def copy_tiny(built: Path, root: Path) -> dict:
    """A private copy under ``root`` of the tiny inputs built once per session (``tiny_inputs``
    in ``tests/conftest.py``): each test file writes its runs next to its own copy."""
    shutil.copytree(built, root, dirs_exist_ok=True)
    return tiny_paths(root)


def run_train(log_dir: Path, *args: str, nproc: int = 1, timeout: float = 300) -> Run:
    """Launch the trainer; ``log_dir`` is passed as ``--log-dir`` (metrics.jsonl)."""
    cmd = torchrun("-m", "eaft_megatron.train", "--log-dir", str(log_dir), "--num-workers", "0",
                   *args, nproc=nproc)
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    metrics = Path(log_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.is_file() else []
    return Run(proc.returncode, proc.stdout + proc.stderr, records)


def check(run: Run) -> Run:
    assert run.returncode == 0, run.output[-6000:]
    return run
