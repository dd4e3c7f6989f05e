"""Benchmark: EAFT loss vs megatron-core's own vocab-parallel cross-entropy, time and memory.

    python benchmarks/bench_loss.py                      # default shapes, bf16, CPU or GPU
    python benchmarks/bench_loss.py --shapes 2048x32000 --reps 9 --dtype bf16

For each shape (N tokens x V vocabulary, one rank: the per-rank cost of any TP size with
V = V_total / tp), every provider runs forward + backward on the same logits. Runs are
interleaved (every repetition visits the providers in a rotated order) and the table reports
median times and their ratio to megatron-core's ``vocab_parallel_cross_entropy``, and the peak
memory added on top of the logits (CPU: the process's peak RSS, reset through
``/proc/self/clear_refs``; GPU: ``torch.cuda.max_memory_allocated``), including the gradient.
Results are also written to ``benchmarks/results/loss_<device>.csv`` and ``.json``.

Providers: ``megatron`` (vocab_parallel_cross_entropy), ``megatron_fused``
(fused_vocab_parallel_cross_entropy, torch.compile'd by megatron-core; compile time excluded),
``sft``/``eaft_topk``/``eaft_full`` (this package).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    # Inductor's pool of compile workers (for megatron_fused) otherwise keeps competing for the
    # CPU cores and slows every provider that runs after it. Set before megatron-core's import,
    # which loads inductor's config.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def providers(group):
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from eaft_megatron import vocab_parallel_eaft_cross_entropy as eaft

    return {
        "megatron": lambda x, t: vocab_parallel_cross_entropy(x, t, tp_group=group),
        "megatron_fused": lambda x, t: fused_vocab_parallel_cross_entropy(x, t, tp_group=group),
        "sft": lambda x, t: eaft(x, t, loss_type="sft", tp_group=group),
        "eaft_topk": lambda x, t: eaft(x, t, loss_type="eaft", entropy="topk", tp_group=group),
        "eaft_full": lambda x, t: eaft(x, t, loss_type="eaft", entropy="full", tp_group=group),
    }


def run_once(fn, logits, target):
    x = logits.detach().requires_grad_()
    loss = fn(x, target)
    loss.sum().backward()
    return x.grad


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_peak(fn, logits, target, device) -> int:
    """Bytes added on top of the inputs at the peak of one forward + backward."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grad = run_once(fn, logits, target)
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        _reset_peak_rss()
        grad = run_once(fn, logits, target)
        peak = _peak_rss_bytes() - base
    del grad
    return peak


HEADER = ["tokens", "vocab", "provider", "median_ms", "time_vs_megatron", "peak_mib",
          "peak_vs_megatron"]


def make_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Logits [n, v] (N(0, 2^2), in ``dtype``) and random labels, drawn on ``device`` (a
    GPU-sized tensor takes seconds to draw on the host)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen, device=device) * 2.0).to(dtype)
    target = torch.randint(0, v, (n,), generator=gen, device=device)
    return logits, target


def measure(provs: dict, logits: torch.Tensor, target: torch.Tensor, *, reps: int,
            device: torch.device, dtype_name: str) -> list[dict]:
    """One row per provider: peak memory of one forward + backward (after a warm-up, which
    also compiles megatron_fused), then ``reps`` interleaved timed repetitions."""
    names = list(provs)
    peaks = {}
    for name in names:  # warm-up (and megatron_fused's compile), then peak memory
        run_once(provs[name], logits, target)
        peaks[name] = measure_peak(provs[name], logits, target, device)
    times = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            run_once(provs[name], logits, target)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    base_t = statistics.median(times["megatron"]) if "megatron" in times else None
    base_m = peaks.get("megatron")
    n, v = logits.shape
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append(dict(
            device=device.type, dtype=dtype_name, tokens=n, vocab=v, provider=name,
            median_ms=round(med * 1e3, 2),
            p10_ms=round(sorted(times[name])[len(times[name]) // 10] * 1e3, 2),
            time_vs_megatron=round(med / base_t, 3) if base_t else None,
            peak_mib=round(peaks[name] / 2**20, 1),
            peak_vs_megatron=round(peaks[name] / base_m, 3) if base_m else None,
            logits_mib=round(logits.numel() * logits.element_size() / 2**20, 1),
        ))
    return rows


def markdown_table(rows: list[dict], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--shapes", default="2048x32000,8192x32000,2048x151936",
                        help="comma-separated NxV (tokens x vocabulary per rank)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--providers", default=None, help="comma-separated subset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    group = dist.group.WORLD
    provs = providers(group)
    if args.providers:
        provs = {k: provs[k] for k in args.providers.split(",")}
    dtype = DTYPES[args.dtype]

    rows = []
    for shape in args.shapes.split(","):
        n, v = (int(s) for s in shape.lower().split("x"))
        logits, target = make_inputs(n, v, dtype, device)
        rows += measure(provs, logits, target, reps=args.reps, device=device,
                        dtype_name=args.dtype)
        del logits, target

    print(f"\n{device.type} {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, dtype {args.dtype}, "
          f"{args.reps} interleaved reps (forward + backward)")
    print(markdown_table(rows, HEADER))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"loss_{device.type}"
    with open(f"{stem}.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(f"{stem}.csv.tmp", f"{stem}.csv")
    meta = dict(machine=platform.node(), cpu=platform.processor(), threads=torch.get_num_threads(),
                torch=torch.__version__, python=sys.version.split()[0], rows=rows)
    with open(f"{stem}.json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(f"{stem}.json.tmp", f"{stem}.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
