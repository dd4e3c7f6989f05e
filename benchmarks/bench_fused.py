"""Benchmark: fused output layer + EAFT loss vs unfused (output layer GEMM + the loss op).

    python benchmarks/bench_fused.py                                  # CPU-sized defaults
    python benchmarks/bench_fused.py --tokens 8192 --hidden 1024,2048,4096 --vocab 151936  # GPU

For each hidden size, forward + backward of both paths on the same inputs, interleaved, with
Megatron's upstream gradient (a constant on supervised tokens). Reports median time, the ratio
fused / unfused, and peak memory added on top of the inputs (hidden states and weight; CPU:
peak RSS reset through ``/proc/self/clear_refs``; GPU: ``max_memory_allocated``), gradients
included; ``loss_part`` is that peak minus the gradients every path returns (the logits, their
fp32 working copy, chunk buffers). Also megatron-core's own output layer +
``vocab_parallel_cross_entropy`` as a reference row. Results:
``benchmarks/results/fused_<device>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench_loss import (  # noqa: E402
    _peak_rss_bytes, _reset_peak_rss, _rss_bytes, markdown_table, sync,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def providers(group):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from eaft_megatron import fused_linear_eaft_cross_entropy, vocab_parallel_eaft_cross_entropy

    def unfused(h, w, t):
        return vocab_parallel_eaft_cross_entropy(h @ w.t(), t, tp_group=group)

    def fused(h, w, t):
        return fused_linear_eaft_cross_entropy(h, w, t, tp_group=group)

    def megatron(h, w, t):
        return vocab_parallel_cross_entropy(h @ w.t(), t, tp_group=group)

    return {"unfused_eaft": unfused, "fused_eaft": fused, "megatron_ce": megatron}


def run_once(fn, hidden, weight, target, mask):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    loss = fn(h, w, target)
    (loss * mask).sum().backward()
    return h.grad, w.grad


def measure_peak(fn, hidden, weight, target, mask, device) -> int:
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = run_once(fn, hidden, weight, target, mask)
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        _reset_peak_rss()
        grads = run_once(fn, hidden, weight, target, mask)
        peak = _peak_rss_bytes() - base
    del grads
    return peak


HEADER = ["hidden", "provider", "median_ms", "time_vs_unfused", "peak_mib", "loss_part_mib",
          "loss_part_vs_unfused"]


def make_inputs(tokens: int, hsize: int, vocab: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0):
    """(hidden [tokens, 1, h], weight [vocab, h], target [tokens, 1] with the first quarter
    ignored, Megatron's upstream gradient ``mask``), drawn on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(tokens, 1, hsize, generator=gen, device=device).to(dtype)
    weight = (torch.randn(vocab, hsize, generator=gen, device=device) / hsize ** 0.5).to(dtype)
    target = torch.randint(0, vocab, (tokens, 1), generator=gen, device=device)
    target[: tokens // 4] = -100
    mask = (target != -100).float() / (target != -100).sum()
    return hidden, weight, target, mask


def measure(provs: dict, hidden, weight, target, mask, *, reps: int, device: torch.device,
            dtype_name: str) -> list[dict]:
    """One row per provider (``unfused_eaft`` is the baseline): peak memory after a warm-up,
    then ``reps`` interleaved timed repetitions."""
    peaks, times = {}, {k: [] for k in provs}
    for name, fn in provs.items():
        run_once(fn, hidden, weight, target, mask)  # warm-up
        peaks[name] = measure_peak(fn, hidden, weight, target, mask, device)
    names = list(provs)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            run_once(provs[name], hidden, weight, target, mask)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    base_t = statistics.median(times["unfused_eaft"])
    # The gradients of hidden states and weight are outputs of every path: "loss part"
    # memory is what remains above them (the logits, working buffers, chunk buffers).
    grads = (hidden.numel() + weight.numel()) * hidden.element_size()
    base_m = peaks["unfused_eaft"] - grads
    tokens, hsize, vocab = hidden.shape[0], hidden.shape[-1], weight.shape[0]
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append(dict(device=device.type, dtype=dtype_name, tokens=tokens,
                         hidden=hsize, vocab=vocab, provider=name,
                         median_ms=round(med * 1e3, 1),
                         time_vs_unfused=round(med / base_t, 3),
                         peak_mib=round(peaks[name] / 2**20, 1),
                         loss_part_mib=round((peaks[name] - grads) / 2**20, 1),
                         loss_part_vs_unfused=round((peaks[name] - grads) / base_m, 3)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", default="1024,2048")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="fp32 on CPU (bf16 GEMMs are slow on most CPUs), bf16 on GPU")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    group = dist.group.WORLD
    provs = providers(group)
    dtype = DTYPES[args.dtype]
    rows = []
    for hsize in (int(x) for x in args.hidden.split(",")):
        inputs = make_inputs(args.tokens, hsize, args.vocab, dtype, device)
        rows += measure(provs, *inputs, reps=args.reps, device=device, dtype_name=args.dtype)
        del inputs
    print(f"\n{device.type}, {args.dtype}, N={args.tokens}, V={args.vocab}, {args.reps} reps, "
          f"forward + backward (output layer + loss)")
    print(markdown_table(rows, HEADER))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fused_{device.type}.csv"
    with open(f"{path}.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(f"{path}.tmp", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
