"""Benchmark: conversion time and peak host memory, both directions, for a ~1B model.

    python benchmarks/bench_convert.py                 # Qwen3-style ~1.1B, bf16, in a temp dir
    python benchmarks/bench_convert.py --layers 4      # smaller, for a quick look
    python benchmarks/bench_convert.py --untied        # separate lm_head (converted last)
    python benchmarks/bench_convert.py --moe           # Qwen3-MoE ~1B, 128 experts of 128
    python benchmarks/bench_convert.py --moe --dtype fp32 --experts 64 --moe-ffn 256
    python benchmarks/bench_convert.py --qwen35        # Qwen3.5-0.8B-shaped gated-DeltaNet hybrid
    python benchmarks/bench_convert.py --nproc 1 2 4   # both directions at --nproc 1, 2, 4

A synthetic Qwen3-architecture HF model (random bf16 weights, sharded safetensors, no
download) is written first; then ``eaft-megatron convert hf-to-megatron --tp 2`` and
``convert megatron-to-hf`` each run in a fresh process whose peak RSS (``VmHWM``) is read.
This is done twice: with ``--vocab`` (151936, which --tp 2 pads to 152064: the padded rows) and
with the largest multiple of 256 below it (no padding). The table reports seconds, peak RSS,
the process's RSS right after its imports, and both as a multiple of the checkpoint's size on
disk (targets: peak above imports <= 1.15x, total <= 1.3x). Results go to
``benchmarks/results/convert_cpu.csv``.

``--moe``: a Qwen3-MoE model with many small experts instead (default 12 layers, hidden 1024,
128 experts of intermediate size 128, top-8, untied: ~0.98B parameters, 4608 expert tensors),
written straight as safetensors shards with the names ``save_pretrained`` produces (one tensor
per expert), no transformers model built; one vocabulary (``--vocab``, padded at --tp 2).
Results go to ``benchmarks/results/convert_moe_cpu.csv`` (appended per ``--dtype``).

``--qwen35``: a ``Qwen3_5ForCausalLM`` with Qwen3.5-0.8B's shape (24 layers, 3 of every 4 gated
DeltaNet, hidden 1024, vocabulary 248320, tied; ~0.75B parameters), names and shapes taken from
transformers' own model built on the meta device. Results go to
``benchmarks/results/convert_qwen35_cpu.csv``.

``--nproc 1 2 4``: each direction at each ``--nproc`` (one vocabulary, the padded one; the
exports read the conversion of the first N), with the columns ``nproc``,
``worker_peak_rss_gib`` (the largest worker), ``peak_above_imports_gib`` (the largest process,
parent or worker, minus the parent's RSS after its imports: a worker's own fixed cost -- gloo,
the store, the model built without memory -- is counted as conversion memory, so this
overstates a worker's share) and ``target_gib`` (issue 21's bound, 1.15 x checkpoint / N +
0.5 GiB). Results go to ``benchmarks/results/convert_nproc_cpu.csv`` (``--moe``:
``convert_moe_nproc_cpu.csv``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
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
    return _write_shards(directory, shapes, torch.bfloat16)


def make_qwen35_model(directory: Path, *, layers: int, hidden: int, vocab: int) -> int:
    """Write a random bf16 Qwen3.5 (gated-DeltaNet hybrid) HF model shaped like Qwen3.5-0.8B
    (hidden 1024: 8 heads of 256, 2 KV heads, DeltaNet 16 x 128 key and value heads, MLP 3584);
    return its size on disk (bytes)."""
    import torch
    import transformers
    from eaft_megatron.models import get_arch, hf_names

    config = transformers.Qwen3_5TextConfig(
        architectures=["Qwen3_5ForCausalLM"], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=hidden * 7 // 2, num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
        head_dim=256, linear_num_key_heads=hidden // 64, linear_num_value_heads=hidden // 64,
        linear_key_head_dim=128, linear_value_head_dim=128, tie_word_embeddings=True,
        max_position_embeddings=4096, dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in
                  transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    shapes.pop("lm_head.weight", None)
    assert set(shapes) == set(hf_names(get_arch(config), config)), "names differ from the mapping"
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    return _write_shards(directory, shapes, torch.bfloat16)


def make_moe_model(directory: Path, *, layers: int, hidden: int, vocab: int, experts: int,
                   topk: int, moe_ffn: int, dtype: str = "bfloat16") -> int:
    """Write a random Qwen3-MoE HF model tensor by tensor (no transformers model: its names
    as ``save_pretrained`` writes them, checked against the converter's own list); return its
    size on disk (bytes)."""
    import torch
    import transformers

    heads, kv, head_dim = hidden // 64, max(1, hidden // 256), 128
    config = transformers.Qwen3MoeConfig(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=3 * hidden, moe_intermediate_size=moe_ffn, num_experts=experts,
        num_experts_per_tok=topk, norm_topk_prob=True, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        tie_word_embeddings=False, max_position_embeddings=4096, dtype=dtype,
    )
    H, L = hidden, "model.layers.{}."
    per_layer = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (heads * head_dim, H),
        "self_attn.k_proj.weight": (kv * head_dim, H),
        "self_attn.v_proj.weight": (kv * head_dim, H),
        "self_attn.o_proj.weight": (H, heads * head_dim),
        "self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,),
        "mlp.gate.weight": (experts, H),
        **{f"mlp.experts.{e}.{proj}.weight": shape for e in range(experts)
           for proj, shape in (("gate_proj", (moe_ffn, H)), ("up_proj", (moe_ffn, H)),
                               ("down_proj", (H, moe_ffn)))},
    }
    shapes = {"model.embed_tokens.weight": (vocab, H)}
    for i in range(layers):
        shapes.update({L.format(i) + k: v for k, v in per_layer.items()})
    shapes.update({"model.norm.weight": (H,), "lm_head.weight": (vocab, H)})
    from eaft_megatron.models import get_arch, hf_names

    assert set(shapes) == set(hf_names(get_arch(config), config)), "names differ from the mapping"
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    return _write_shards(directory, shapes, getattr(torch, dtype))


def _write_shards(directory: Path, shapes: dict, dtype) -> int:
    """Random tensors of ``shapes`` (norms 1) in ~1 GiB safetensors shards + index."""
    import torch
    from safetensors.torch import save_file

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
        t = torch.randn(shape, generator=gen) * 0.02
        shard[name] = (t + 1 if "norm" in name else t).to(dtype)
        shard_bytes += shard[name].numel() * shard[name].element_size()
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
    # --nproc workers (children of this process): the largest peak of one of them
    import resource

    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print("RESULT " + json.dumps(dict(rc=rc, import_s=t1 - t0, convert_s=t2 - t1,
                                      baseline=baseline, peak=peak, worker_peak=workers)))


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
    p.add_argument("--layers", type=int, default=None, help="default 16 (--moe: 12)")
    p.add_argument("--hidden", type=int, default=None, help="default 2048 (--moe: 1024)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--untied", action="store_true", help="separate lm_head.weight")
    p.add_argument("--moe", action="store_true", help="Qwen3-MoE with many small experts")
    p.add_argument("--qwen35", action="store_true",
                   help="Qwen3.5-0.8B-shaped gated-DeltaNet hybrid (dense, tied)")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--moe-ffn", type=int, default=128, help="expert intermediate size")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="checkpoint dtype (--moe only; the dense rows are bf16)")
    p.add_argument("--nproc", type=int, nargs="+", default=[1],
                   help="--nproc values to measure in both directions, e.g. 1 2 4 (one "
                        "vocabulary; adds the columns nproc, worker_peak_rss_gib, "
                        "peak_above_imports_gib, target_gib)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="CSV (default results/convert_cpu.csv, --moe: "
                                               "results/convert_moe_cpu.csv)")
    args = p.parse_args()
    results = Path(__file__).parent / "results"
    kind = "moe" if args.moe else "qwen35" if args.qwen35 else None
    nprocs = args.nproc != [1]
    default = f"convert_{kind}_cpu.csv" if kind else "convert_cpu.csv"
    out = Path(args.out or results / (default.replace("_cpu", "_nproc_cpu") if nprocs
                                      else default))
    layers = args.layers or {"moe": 12, "qwen35": 24}.get(kind, 16)
    hidden = args.hidden or {"moe": 1024, "qwen35": 1024}.get(kind, 2048)

    tp = 2
    rows = []
    if args.qwen35 and args.vocab == p.get_default("vocab"):
        args.vocab = 248320  # Qwen3.5's vocabulary
    vocabs = ((args.vocab,) if kind or nprocs else
              (args.vocab, args.vocab // (256 * tp) * 256 * tp))
    for vocab in vocabs:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            tmp = Path(tmp)
            if args.moe:
                size = make_moe_model(tmp / "hf", layers=layers, hidden=hidden, vocab=vocab,
                                      experts=args.experts, topk=args.topk,
                                      moe_ffn=args.moe_ffn, dtype=args.dtype)
                described = dict(dtype=args.dtype, layers=layers, hidden=hidden,
                                 experts=args.experts, topk=args.topk, moe_ffn=args.moe_ffn,
                                 vocab=vocab)
            elif args.qwen35:
                size = make_qwen35_model(tmp / "hf", layers=layers, hidden=hidden, vocab=vocab)
                described = dict(layers=layers, hidden=hidden, vocab=vocab, tied=True)
            else:
                size = make_hf_model(tmp / "hf", layers=layers, hidden=hidden,
                                     vocab=vocab, tied=not args.untied)
                padded = json.loads(_run([sys.executable, "-c", (
                    "from eaft_megatron.models import padded_vocab_size; "
                    f"print(padded_vocab_size({vocab}, {tp}))")]))
                described = dict(vocab=vocab, padded_vocab=padded, tied=not args.untied)
            itemsize = 4 if args.moe and args.dtype == "float32" else 2
            first = args.nproc[0]  # the exports read this conversion
            runs = [("hf-to-megatron", n, tmp / f"mcore{n}",
                     ["hf-to-megatron", "--hf", str(tmp / "hf"), "--out", str(tmp / f"mcore{n}"),
                      "--tp", str(tp), "--nproc", str(n)]) for n in args.nproc]
            runs += [("megatron-to-hf", n, tmp / f"hf_out{n}",
                      ["megatron-to-hf", "--megatron", str(tmp / f"mcore{first}"),
                       "--out", str(tmp / f"hf_out{n}"), "--nproc", str(n)])
                     for n in args.nproc]
            for direction, nproc, result, argv in runs:
                r = run_child(argv)
                if result != tmp / f"mcore{first}":  # (disk: only the exports' input stays)
                    shutil.rmtree(result)
                if nproc > 1:  # the largest process is a worker
                    r["peak"] = max(r["peak"], r["worker_peak"])
                extra = ({} if not nprocs else dict(
                    nproc=nproc, worker_peak_rss_gib=round(r["worker_peak"] / 2**30, 2)
                    if nproc > 1 else "",
                    peak_above_imports_gib=round((r["peak"] - r["baseline"]) / 2**30, 2),
                    target_gib=round((1.15 * size / nproc + 2**29) / 2**30, 2)))
                rows.append(dict(
                    direction=direction, **extra, **described,
                    params_b=round(size / itemsize / 1e9, 3),
                    checkpoint_gib=round(size / 2**30, 2), seconds=round(r["convert_s"], 1),
                    peak_rss_gib=round(r["peak"] / 2**30, 2),
                    peak_vs_size=round(r["peak"] / size, 2),
                    imports_rss_gib=round(r["baseline"] / 2**30, 2),
                    peak_above_imports_vs_size=round((r["peak"] - r["baseline"]) / size, 2),
                ))
                print(rows[-1], flush=True)
    header = list(rows[0])
    if args.moe and out.is_file():  # one file for all MoE runs: replace this dtype's rows
        with open(out, newline="") as f:
            old = [r for r in csv.DictReader(f) if r.get("dtype") != args.dtype]
        if old and list(old[0]) == header:
            rows = old + rows
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r[h]) for h in header) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    os.replace(f"{out}.tmp", out)

if __name__ == "__main__":
    main()
