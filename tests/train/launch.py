"""Run ``python -m eaft_megatron.train`` under torchrun (real gloo groups, Megatron's own loop)
and read back its ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    returncode: int
    output: str
    records: list[dict]

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind]

    def train(self) -> dict[int, dict]:
        return {r["iteration"]: r for r in self.of("train")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict:
    """The environment of every child the training tests start: this checkout importable, one
    thread per process, no warnings noise."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra,
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def build_tiny(root: Path) -> dict:
    """``fixtures.py``'s tiny Qwen3 (HF + converted checkpoint) and data, built in a child."""
    subprocess.run([sys.executable, "-m", "tests.train.fixtures", str(root)], cwd=ROOT,
                   env=subprocess_env(), check=True, capture_output=True, timeout=300)
    return dict(root=root, ckpt=root / "mcore", data=root / "data" / "train")


def run_train(log_dir: Path, *args: str, nproc: int = 1, timeout: float = 300) -> Run:
    """Launch the trainer; ``log_dir`` is passed as ``--log-dir`` (metrics.jsonl)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "eaft_megatron.train", "--log-dir", str(log_dir), "--num-workers", "0", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    metrics = Path(log_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.is_file() else []
    return Run(proc.returncode, proc.stdout + proc.stderr, records)


def check(run: Run) -> Run:
    assert run.returncode == 0, run.output[-6000:]
    return run
