"""Sizes, tolerances, the per-stage recorder and small tensor helpers (worker side)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    loss_shape: tuple[int, int, int]  # (s, b, V): N = s * b tokens
    fused_check: tuple[int, int, int, int]  # (s, b, hidden, V)
    speed_loss_shapes: tuple[tuple[int, int], ...]  # (N, V)
    speed_fused: tuple[int, tuple[int, ...], int]  # (N, hiddens, V)
    speed_reps: tuple[int, int]  # (loss, fused)
    speed_fused_dtype: str  # bf16 on GPU; fp32 on CPU (bf16 GEMMs are slow on most CPUs)
    megatron_fused: bool  # include megatron-core's torch.compile'd fused CE in the speed stage
    qwen3: ModelSize
    glm4: ModelSize
    model_tokens: tuple[int, int]  # (batch, seq)
    train_model: ModelSize
    train_seq: int
    train_docs: int
    train_iters: int
    train_batch: tuple[int, int]  # (micro, global)
    train_tp2_on_cpu: bool
    stage_timeout: dict
    # (s, b, V) of the Triton path's checks (CPU: Triton's interpreter, so tiny)
    triton_loss_shape: tuple[int, int, int] = (1024, 2, 151936)


GPU = Profile(
    name="gpu",
    loss_shape=(4096, 2, 151936),
    fused_check=(4096, 2, 1024, 151936),
    speed_loss_shapes=((8192, 151936),),
    speed_fused=(8192, (1024, 2048, 4096), 151936),
    speed_reps=(7, 5),
    speed_fused_dtype="bf16",
    megatron_fused=True,
    qwen3=ModelSize(hidden=512, layers=4, heads=8, kv_heads=2, head_dim=128, ffn=1536,
                    vocab=10007),
    glm4=ModelSize(hidden=512, layers=4, heads=8, kv_heads=2, head_dim=64, ffn=1408,
                   vocab=12007),
    model_tokens=(2, 256),
    train_model=ModelSize(hidden=256, layers=4, heads=8, kv_heads=4, head_dim=32, ffn=768,
                          vocab=4096),
    train_seq=256,
    train_docs=600,
    train_iters=40,
    train_batch=(4, 16),
    train_tp2_on_cpu=False,
    stage_timeout=dict(loss=200, speed=210, models=150, train=300),
)
# --cpu-smoke: every stage's code on CPU at tiny sizes (CI), without megatron-core's compiled CE.
SMOKE = Profile(
    name="smoke",
    loss_shape=(32, 2, 2000),
    fused_check=(32, 2, 32, 2000),
    speed_loss_shapes=((128, 4096),),
    speed_fused=(128, (64,), 4096),
    speed_reps=(2, 2),
    speed_fused_dtype="fp32",
    megatron_fused=False,
    qwen3=ModelSize(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32, ffn=128, vocab=301),
    glm4=ModelSize(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=96, vocab=307),
    model_tokens=(2, 16),
    train_model=ModelSize(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=96,
                          vocab=300),
    train_seq=32,
    train_docs=48,
    train_iters=6,
    train_batch=(2, 4),
    train_tp2_on_cpu=False,
    stage_timeout=dict(loss=120, speed=120, models=120, train=180),
    triton_loss_shape=(2, 2, 160),
)
# Hidden: the GPU profile's features (compiled CE, TP=2 training) at CPU-sized shapes.
SMALL = dataclasses.replace(
    SMOKE, name="small", megatron_fused=True, train_tp2_on_cpu=True,
    speed_loss_shapes=((256, 8192),), speed_fused=(256, (64, 128), 8192), speed_reps=(3, 3),
    speed_fused_dtype="bf16",
    stage_timeout=dict(loss=300, speed=300, models=300, train=400),
)
PROFILES = {p.name: p for p in (GPU, SMOKE, SMALL)}

# Tolerances, all scaled by --tol-scale. "worst" is max |a - e| / (atol + rtol |e|) over the
# elements (pass: <= 1, torch.testing.assert_close's rule); "rel" is max |a - e| / max |e|.
TOLERANCES = {
    # Loss op vs float64 reference on the same logit values (the op computes in fp32 whatever
    # the input dtype, so loss and statistics get the same tolerance for fp32 and bf16 input).
    "op_loss": dict(atol=5e-5, rtol=2e-5),  # per-token w * CE (CE ~ 14 at V = 151936)
    "op_weight": dict(atol=2e-5, rtol=2e-5),  # gate weight and p(label)
    "op_entropy": dict(atol=1e-4, rtol=1e-4),  # nats
    # Gradient: returned in the input dtype (bf16 rounding: 2^-9 relative).
    "op_grad_fp32": dict(atol=1e-9, rtol=5e-5),
    "op_grad_bf16": dict(atol=1e-9, rtol=8e-3),
    # fp16 (the Triton path's checks on CPU): subnormals below 6.1e-5, spaced 6e-8
    "op_grad_fp16": dict(atol=6e-8, rtol=2e-3),
    # Fused vs unfused (same dtype). bf16: both round fp32-accumulated GEMM results to bf16
    # logits, with different chunkings (GEMM shapes), so a logit may land on the neighbouring
    # bf16 value: one ulp, <= 2^-7 of it. When that logit is the row maximum, which dominates
    # the log-sum-exp, CE = lse - z_label (>= the maximum's size here) moves by as much:
    # rtol 2^-7. The mean error stays far smaller.
    "fused_loss_fp32": dict(atol=1e-4, rtol=1e-5),
    "fused_loss_bf16": dict(atol=2e-2, rtol=8e-3),
    "fused_loss_mean_bf16": 2e-3,
    "fused_grad_rel_fp32": 1e-4,
    "fused_grad_rel_bf16": 3e-2,
    # Megatron vs transformers logits. fp32: max |diff| / max(1, max |logit|). bf16: measured
    # against transformers' own bf16 error (|hf_bf16 - hf_fp32|): Megatron in bf16 must be as
    # close to transformers in fp32 as transformers in bf16 is, within these factors.
    "model_fp32_rel": 2e-5,
    "model_bf16_mean_factor": 2.0,
    "model_bf16_max_factor": 4.0,
}


class Stage:
    """A stage's results: checks, tables, information; ``stages/<name>.json`` after each."""

    def __init__(self, name: str, out: Path, tol_scale: float, work: Path):
        self.name = name
        self.out = out  # small results (JSON, logs): what comes back from a lent machine
        self.work = work / name  # models, checkpoints, data: scratch
        self.path = out / "stages" / f"{name}.json"
        self.tol_scale = tol_scale
        self.data = dict(stage=name, status="running", checks=[], tables={}, info={})
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def tol(self, key: str):
        value = TOLERANCES[key]
        if isinstance(value, dict):
            return {k: v * self.tol_scale for k, v in value.items()}
        return value * self.tol_scale

    @contextlib.contextmanager
    def check(self, name: str):
        """Run one check; the body calls ``rec.verdict(ok, detail, **metrics)``. An exception
        is a FAIL of this check only."""
        rec = Check(f"{self.name}/{name}")
        t0 = time.perf_counter()
        try:
            yield rec
        except Exception as e:  # noqa: BLE001 - a failing check must not stop the stage
            rec.verdict(False, f"{type(e).__name__}: {str(e)[:400]}")
            rec.data["traceback"] = traceback.format_exc()[-4000:]
        rec.data["seconds"] = round(time.perf_counter() - t0, 2)
        if rec.data.get("ok") is None:
            rec.verdict(False, "no verdict")
        self.data["checks"].append(rec.data)
        print(f"{'PASS' if rec.data['ok'] else 'FAIL'} {rec.data['name']}: {rec.data['detail']}",
              flush=True)
        self.save()

    def info(self, key: str, value, text: str | None = None) -> None:
        self.data["info"][key] = value
        if text:
            print(f"INFO {self.name}/{key}: {text}", flush=True)
        self.save()


class Check:
    def __init__(self, name: str):
        self.data = dict(name=name, ok=None, detail="")

    def verdict(self, ok: bool, detail: str, **metrics) -> None:
        self.data.update(ok=bool(ok), detail=detail)
        if metrics:
            self.data["metrics"] = {k: plain(v) for k, v in metrics.items()}


def plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def fmt(x: float) -> str:
    return f"{x:.2e}"


def single_rank_group(device):
    """A world_size=1 process group (NCCL on GPU, gloo on CPU), no port needed."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def strict_fp32() -> None:
    """fp32 GEMMs in full precision (no TF32), whatever a library may have set."""
    import torch

    torch.set_float32_matmul_precision("highest")


def compare(actual, expected, atol: float, rtol: float) -> tuple[float, float]:
    """(max |a - e|, worst ratio |a - e| / (atol + rtol |e|)), in float64."""
    import torch

    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    if diff.numel() == 0:
        return 0.0, 0.0
    ratio = torch.where(diff == 0, 0.0, diff / (atol + rtol * e.abs()))  # x/0 = inf
    worst = math.inf if torch.isnan(diff).any() else ratio.max().item()
    return diff.max().item(), worst


def rel_max(actual, expected) -> float:
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def kill_group(proc) -> None:
    """SIGTERM, then SIGKILL, to the process group of ``proc`` (started with
    ``start_new_session=True``: itself and the processes it started)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
