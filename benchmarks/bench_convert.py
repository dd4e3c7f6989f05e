"""Benchmark: conversion time and peak host memory, both directions, for a ~1B model.

    python benchmarks/bench_convert.py                 # Qwen3-style ~1.1B, bf16, in a temp dir
    python benchmarks/bench_convert.py --layers 4      # smaller, for a quick look
    python benchmarks/bench_convert.py --untied        # separate lm_head (converted last)

A synthetic Qwen3-architecture HF model (random bf16 weights, sharded safetensors, no
download) is written first; then ``eaft-megatron convert hf-to-megatron --tp 2`` and
``convert megatron-to-hf`` each run in a fresh process whose peak RSS (``VmHWM``) is read.
This is done twice: with ``--vocab`` (151936, which --tp 2 pads to 152064: the padded rows) and
with the largest multiple of 256 below it (no padding). The table reports seconds, peak RSS,
the process's RSS right after its imports, and both as a multiple of the checkpoint's size on
disk (targets: peak above imports <= 1.15x, total <= 1.3x). Results go to
``benchmarks/results/convert_cpu.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_hf_model(directory: Path, *, layers: int, hidden: int, vocab: int,
                  tied: bool = True) -> int:
    """Write a random bf16 Qwen3 HF model; return its size on disk (bytes)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.Qwen3Config(
        architectures=["Qwen3ForCausalLM"], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 256), head_dim=128, tie_word_embeddings=tied,
        max_position_embeddings=4096, dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in
                  transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    if tied:
        shapes.pop("lm_head.weight")
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    gen = torch.Generator().manual_seed(0)
    shard, shard_bytes, weight_map, files = {}, 0, {}, []

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        shard[name] = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
        shard_bytes += shard[name].numel() * 2
        if shard_bytes > 1 << 30:
            flush()
    if shard:
        flush()
    total = sum((directory / f).stat().st_size for f in files)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(argv: list[str]) -> None:
    """Run one conversion in this process and print JSON with timings and peak RSS."""
    # ru_maxrss survives fork+exec (it would report the parent's peak): reset VmHWM instead.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    from eaft_megatron.cli import main
    import eaft_megatron.convert.convert  # noqa: F401  (imports counted in the baseline)
    import megatron.core  # noqa: F401
    baseline = _peak_rss()
    t1 = time.perf_counter()
    rc = main(["convert", *argv])
    t2 = time.perf_counter()
    peak = _peak_rss()
    print("RESULT " + json.dumps(dict(rc=rc, import_s=t1 - t0, convert_s=t2 - t1,
                                      baseline=baseline, peak=peak)))


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def run_child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True,
                         text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            if result["rc"] == 0:
                return result
    raise RuntimeError(f"conversion failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--untied", action="store_true", help="separate lm_head.weight")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "convert_cpu.csv"))
    args = p.parse_args()

    tp = 2
    rows = []
    for vocab in (args.vocab, args.vocab // (256 * tp) * 256 * tp):
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            tmp = Path(tmp)
            size = make_hf_model(tmp / "hf", layers=args.layers, hidden=args.hidden,
                                 vocab=vocab, tied=not args.untied)
            padded = json.loads(_run([sys.executable, "-c", (
                "from eaft_megatron.models import padded_vocab_size; "
                f"print(padded_vocab_size({vocab}, {tp}))")]))
            for direction, argv in (
                ("hf-to-megatron", ["hf-to-megatron", "--hf", str(tmp / "hf"), "--out",
                                    str(tmp / "mcore"), "--tp", str(tp)]),
                ("megatron-to-hf", ["megatron-to-hf", "--megatron", str(tmp / "mcore"),
                                    "--out", str(tmp / "hf_out")]),
            ):
                r = run_child(argv)
                rows.append(dict(
                    direction=direction, vocab=vocab, padded_vocab=padded,
                    tied=not args.untied, params_b=round(size / 2 / 1e9, 3),
                    checkpoint_gib=round(size / 2**30, 2), seconds=round(r["convert_s"], 1),
                    peak_rss_gib=round(r["peak"] / 2**30, 2),
                    peak_vs_size=round(r["peak"] / size, 2),
                    imports_rss_gib=round(r["baseline"] / 2**30, 2),
                    peak_above_imports_vs_size=round((r["peak"] - r["baseline"]) / size, 2),
                ))
                print(rows[-1], flush=True)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r[h]) for h in header) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    os.replace(f"{out}.tmp", out)


if __name__ == "__main__":
    main()
