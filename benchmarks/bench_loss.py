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
``sft``/``eaft_topk``/``eaft_full`` (this package's PyTorch path, ``impl="torch"``), on CUDA
``triton_sft``/``triton_eaft_topk``/``triton_eaft_full`` (its Triton kernels, ``impl="triton"``)
and ``liger`` (Liger-Kernel's cross-entropy, when ``liger_kernel`` is importable; it writes its
gradient into the logits in forward, so it gets a fresh copy of them outside the timing).

Bandwidth: ``gbps`` is ``3 x`` the logits' bytes (read in forward, read in backward, gradient
written: the floor for a separate forward and backward) over the median time, ``bw_frac`` that
over the device's peak memory bandwidth (CUDA: ``2 x memory clock x bus width``; CPU: blank).
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


def providers(group, *, triton: bool = False, liger: bool = False):
    """Name -> ``fn(logits, target)`` returning per-token losses (or their sum). ``triton``: add
    this package's Triton kernels; ``liger``: add Liger-Kernel's CE when it is importable."""
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from eaft_megatron import vocab_parallel_eaft_cross_entropy as eaft

    provs = {
        "megatron": lambda x, t: vocab_parallel_cross_entropy(x, t, tp_group=group),
        "megatron_fused": lambda x, t: fused_vocab_parallel_cross_entropy(x, t, tp_group=group),
    }
    impls = {"": "torch", "triton_": "triton"} if triton else {"": "torch"}
    for prefix, impl in impls.items():
        provs[f"{prefix}sft"] = lambda x, t, i=impl: eaft(x, t, loss_type="sft", tp_group=group,
                                                          impl=i)
        for entropy in ("topk", "full"):
            provs[f"{prefix}eaft_{entropy}"] = lambda x, t, e=entropy, i=impl: eaft(
                x, t, loss_type="eaft", entropy=e, tp_group=group, impl=i)
    if liger:
        try:
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        except ImportError:
            pass
        else:
            provs["liger"] = MutatesInput(LigerCrossEntropyLoss(reduction="sum"))
    return provs


class MutatesInput:
    """A provider that overwrites its input logits (it gets a copy, made outside the timing)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x, t):
        return self.fn(x, t)


def _input(fn, logits):
    x = logits.clone() if isinstance(fn, MutatesInput) else logits.detach()
    return x.requires_grad_()


def run_once(fn, logits, target, x=None):
    x = _input(fn, logits) if x is None else x
    loss = fn(x, target)
    loss.sum().backward()
    return x.grad


def peak_bandwidth(device) -> float | None:
    """The device's peak memory bandwidth in bytes/s (CUDA: DDR, 2 x clock x bus width)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = (getattr(props, k, 0) for k in ("memory_clock_rate",
                                                           "memory_bus_width"))
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_peak(fn, logits, target, device) -> int:
    """Bytes added on top of the inputs at the peak of one forward + backward."""
    x = _input(fn, logits)  # (a provider that overwrites its input: its copy counts as input)
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grad = run_once(fn, logits, target, x)
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        _reset_peak_rss()
        grad = run_once(fn, logits, target, x)
        peak = _peak_rss_bytes() - base
    del grad, x
    return peak


HEADER = ["tokens", "vocab", "provider", "median_ms", "time_vs_megatron", "peak_mib",
          "peak_vs_megatron", "bytes_per_logit", "gbps", "bw_frac"]


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
            x = _input(provs[name], logits)
            sync(device)
            t0 = time.perf_counter()
            run_once(provs[name], logits, target, x)
            sync(device)
            times[name].append(time.perf_counter() - t0)
            del x
    base_t = statistics.median(times["megatron"]) if "megatron" in times else None
    base_m = peaks.get("megatron")
    n, v = logits.shape
    peak_bw = peak_bandwidth(device)
    traffic = 3 * logits.numel() * logits.element_size()
    rows = []
    for name in names:
        med = statistics.median(times[name])
        gbps = traffic / med / 1e9
        rows.append(dict(
            device=device.type, dtype=dtype_name, tokens=n, vocab=v, provider=name,
            median_ms=round(med * 1e3, 2),
            p10_ms=round(sorted(times[name])[len(times[name]) // 10] * 1e3, 2),
            time_vs_megatron=round(med / base_t, 3) if base_t else None,
            peak_mib=round(peaks[name] / 2**20, 1),
            peak_vs_megatron=round(peaks[name] / base_m, 3) if base_m else None,
            logits_mib=round(logits.numel() * logits.element_size() / 2**20, 1),
            bytes_per_logit=round(peaks[name] / logits.numel(), 2),
            gbps=round(gbps, 1),
            bw_frac=round(gbps * 1e9 / peak_bw, 3) if peak_bw else "",
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
    provs = providers(group, triton=device.type == "cuda", liger=device.type == "cuda")
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
