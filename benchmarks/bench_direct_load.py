"""Benchmark: the trainer starting straight from a Hugging Face directory vs convert-then-train.

    python benchmarks/bench_direct_load.py               # Qwen2.5-0.5B shape, fp32, TP=2, PP=2
    python benchmarks/bench_direct_load.py --layers 4 --hidden 256 --vocab 32000   # a quick look
    python benchmarks/bench_direct_load.py --layouts tp2      # one layout only

A random model of Qwen2.5-0.5B's shape (``Qwen2ForCausalLM``: 24 layers, hidden 896, 14 heads /
2 KV heads, MLP 4864, vocabulary 151936, tied; 494M parameters) is built by transformers from
its config and saved with ``save_pretrained`` in fp32 (what the trainer computes in on CPU, so
the model in memory is the checkpoint's size). For each layout (TP=2, PP=2; 2 ranks each):

* ``direct``: ``torchrun -m eaft_megatron.train --load HF_DIR --train-iters 1``;
* ``convert``: ``eaft-megatron convert hf-to-megatron --tp T --pp P`` (one process: wall time and
  peak RSS), then the same trainer command with ``--load`` the converted checkpoint.

The trainer ranks run this file (``--rank``), which wraps the trainer's model provider, its
``fill_from_hf`` and Megatron's ``setup_model_and_optimizer`` to read each rank's ``VmRSS`` /
``VmHWM`` (peak) at points of the start-up: after imports (the provider's entry: the baseline),
after the model is built (direct: without random initialisation; convert: with megatron's),
after it is filled from the HF files (direct; the provider's exit: the *load* peak of the
direct path), after the gradient buffers and optimizer are set up and (convert) the
checkpoint loaded, and at the end of the run (one iteration: Adam's state included). Time to
the first iteration: from the launch to the ``time`` of the first ``train`` record in
metrics.jsonl (plus the conversion's wall time for ``convert``). Nothing is saved (no
``--save``). Results: a table on stdout and ``benchmarks/results/direct_load_cpu.csv``.

Target (issue 21): the direct path's per-rank peak while loading, above the rank's RSS after
imports, <= 1.15 x checkpoint / ranks + 0.5 GiB. (At PP=2 of a tied model both stages hold
the whole embedding, so a rank holds more than checkpoint / ranks: the table also gives the
rank's own parameter bytes.)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _mark(marks: dict, name: str) -> None:
    marks[name] = dict(t=time.time(), rss=_status("VmRSS"), peak=_status("VmHWM"))


def rank_main(argv: list[str]) -> int:
    """One trainer rank with the measuring wrappers (see the module doc)."""
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM from here (not the launcher's)
        f.write("5")
    marks: dict = {}
    _mark(marks, "process_start")
    from eaft_megatron.compat.lazy_compile import defer_torch_compile

    defer_torch_compile()  # as the trainer's entry point does, before megatron's import
    import megatron.training.training as loop

    from eaft_megatron.train import __main__ as entry
    from eaft_megatron.train import hf_load, steps

    entry.quiet_no_cuda_notice()
    provider, fill, setup = steps.model_provider, hf_load.fill_from_hf, \
        loop.setup_model_and_optimizer

    def model_provider(*a, **kw):
        _mark(marks, "provider_entry")
        model = provider(*a, **kw)
        _mark(marks, "provider_exit")
        marks["rank_param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        return model

    def fill_from_hf(*a, **kw):
        _mark(marks, "fill_start")
        return fill(*a, **kw)

    def setup_model_and_optimizer(*a, **kw):
        out = setup(*a, **kw)
        _mark(marks, "setup_done")
        return out

    steps.model_provider, hf_load.fill_from_hf = model_provider, fill_from_hf
    loop.setup_model_and_optimizer = setup_model_and_optimizer
    sys.argv = [sys.argv[0], *argv]
    rc = entry.main()
    _mark(marks, "end")
    out = Path(os.environ["BENCH_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(marks))
    return rc


def make_model(directory: Path, args) -> int:
    """Save the random model with transformers (in a child: its 2 GB leave with it)."""
    code = f"""
import torch, transformers
config = transformers.Qwen2Config(
    architectures=["Qwen2ForCausalLM"], vocab_size={args.vocab}, hidden_size={args.hidden},
    intermediate_size={args.ffn}, num_hidden_layers={args.layers},
    num_attention_heads={args.heads}, num_key_value_heads={args.kv_heads},
    tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1e6,
    rms_norm_eps=1e-6, dtype="float32")
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained({str(directory)!r})
print(sum(p.numel() for p in model.parameters()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return int(out.stdout.split()[-1])


def make_data(prefix: Path, vocab: int, seq: int) -> Path:
    """24 tokenized conversations (ids < min(vocab, 1000)), prepared for the trainer."""
    import random

    from eaft_megatron.data import preprocess

    rng = random.Random(0)
    jsonl = prefix.parent / "train.jsonl"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(jsonl, "w") as f:
        for _ in range(24):
            ids = [rng.randrange(2, min(vocab, 1000)) for _ in range(rng.randrange(seq // 2, seq))]
            f.write(json.dumps({"input_ids": ids, "labels": [-100] * 4 + ids[4:]}) + "\n")
    preprocess([jsonl], output_prefix=prefix, seq_length=seq, fmt="tokenized", progress=False)
    return prefix


def _wait_rusage(proc: subprocess.Popen) -> int:
    """Wait for ``proc``; its peak RSS and that of the descendants it waited for (bytes)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024


def train(load: Path, layout: list[str], data: Path, work: Path, name: str) -> dict:
    log = work / f"{name}.log"
    flags = ["--log-dir", str(work / name), "--num-workers", "0", "--load", str(load),
             "--data-path", str(data), "--train-iters", "1", "--micro-batch-size", "1",
             "--global-batch-size", "1", "--lr", "1e-5", "--min-lr", "1e-5",
             "--lr-decay-style", "constant", "--eval-iters", "0", "--eval-interval", "1000",
             "--log-interval", "1", "--loss-type", "eaft", *layout]
    env = {**os.environ, "BENCH_OUT": str(work / name / "marks"), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    for _ in range(3):  # a shared machine: the free port may be taken before torchrun binds it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__,
               "--rank", *flags]
        start = time.time()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            _wait_rusage(proc)
        wall = time.time() - start
        if proc.returncode == 0 or "EADDRINUSE" not in log.read_text():
            break
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{name}: the trainer failed (exit {proc.returncode}):\n{tail}")
    records = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["kind"] == "train")
    ranks = [json.loads((work / name / "marks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return dict(first_iteration_s=first["time"] - start, wall_s=wall, ranks=ranks)


def convert(hf: Path, out: Path, tp: int, pp: int) -> dict:
    cmd = [sys.executable, "-m", "eaft_megatron", "convert", "hf-to-megatron", "--hf", str(hf),
           "--out", str(out), "--tp", str(tp), "--pp", str(pp)]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"})
    peak = _wait_rusage(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed: {proc.stderr.read()[-2000:]}")
    return dict(seconds=time.time() - start, peak=peak)


def _free_port() -> int:
    from eaft_megatron.compat.processes import free_port

    return free_port()


LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        sys.exit(rank_main(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--ffn", type=int, default=4864)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["tp2", "pp2"])
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "direct_load_cpu.csv"))
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        params = make_model(work / "hf", args)
        size = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
        data = make_data(work / "data" / "train", args.vocab, args.seq)
        print(f"model: {params / 1e6:.0f}M parameters, checkpoint {size / GIB:.2f} GiB (fp32); "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        for layout in args.layouts:
            tp, pp = LAYOUTS[layout]
            flags = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size",
                     str(pp)]
            direct = train(work / "hf", flags, data, work, f"direct-{layout}")
            conv = convert(work / "hf", work / f"mcore-{layout}", tp, pp)
            converted = train(work / f"mcore-{layout}", flags, data, work, f"convert-{layout}")
            for path, run in (("direct", direct), ("convert", converted)):
                for rank, m in enumerate(run["ranks"]):
                    base = m["provider_entry"]["rss"]
                    built = m.get("fill_start") or m["provider_exit"]
                    rows.append(dict(
                        layout=f"TP={tp} PP={pp}", path=path, rank=rank,
                        checkpoint_gib=round(size / GIB, 2),
                        rank_params_gib=round(m["rank_param_bytes"] / GIB, 2),
                        imports_rss_gib=round(base / GIB, 2),
                        # the model provider: build (+ fill from the HF files, direct)
                        provider_peak_above_imports_gib=round(
                            (m["provider_exit"]["peak"] - base) / GIB, 2),
                        fill_raised_peak_gib=round(
                            (m["provider_exit"]["peak"] - built["peak"]) / GIB, 2)
                        if path == "direct" else "",
                        target_gib=round(1.15 * size / 2 / GIB + 0.5, 2),
                        # + DDP gradient buffers, optimizer (+ the torch_dist load, convert)
                        setup_peak_gib=round(m["setup_done"]["peak"] / GIB, 2),
                        run_peak_gib=round(m["end"]["peak"] / GIB, 2),
                        build_s=round(built["t"] - m["provider_entry"]["t"], 1),
                        fill_s=round(m["provider_exit"]["t"] - built["t"], 1)
                        if path == "direct" else "",
                        convert_s=round(conv["seconds"], 1) if path == "convert" else "",
                        convert_peak_gib=round(conv["peak"] / GIB, 2) if path == "convert"
                        else "",
                        launch_to_iteration_1_s=round(run["first_iteration_s"], 1),
                        to_iteration_1_s=round(run["first_iteration_s"]
                                               + (conv["seconds"] if path == "convert"
                                                  else 0), 1),
                    ))
                    print(rows[-1], flush=True)
    meta = dict(machine=platform.node(), cpus=os.cpu_count(),
                loadavg=round(os.getloadavg()[0], 1), date=time.strftime("%Y-%m-%d %H:%M"))
    print(meta)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r[h]) for h in header) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*header, *meta])
        w.writeheader()
        w.writerows({**r, **meta} for r in rows)
    os.replace(f"{out}.tmp", out)


if __name__ == "__main__":
    main()
