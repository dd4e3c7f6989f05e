"""``eaft-megatron demo``: the whole pipeline end to end, on any machine, with no download.

    eaft-megatron demo                               # CPU: ~4 min on 2 cores, into ./eaft-demo
    eaft-megatron demo --quick --workdir /tmp/d      # tiny sizes (the test uses this)
    eaft-megatron demo --hf-model DIR --data a.jsonl --tp 2 --iters 200   # your model and data

Steps (each says what it does and where its output is):
 1. a small Qwen3 model in Hugging Face format (a BPE tokenizer trained on the bundled chat data
    and a randomly initialised ``Qwen3ForCausalLM``), unless ``--hf-model`` is given;
 2. ``convert hf-to-megatron`` at ``--tp`` (default 2);
 3. ``preprocess`` of the bundled chat dataset (or ``--data``): assistant-only loss masks;
 4. the trainer, ``torchrun -m eaft_megatron.train`` with EAFT on ``--tp x --pp`` ranks (gloo
    and fp32 on CPU; NCCL and bf16 on GPU), evaluating before and after;
 5. ``convert megatron-to-hf`` of the trained checkpoint;
 6. ``transformers`` loads the result and generates, and its logits are compared with the
    Megatron model's on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .assets import BUNDLED_DATA, make_qwen3_model, train_tokenizer


@dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    vocab: int
    seq_length: int
    iters: int
    global_batch: int
    conversations: int | None  # None: all of the data


FULL = Sizes(hidden=128, layers=4, vocab=512, seq_length=128, iters=300, global_batch=16,
             conversations=None)
QUICK = Sizes(hidden=64, layers=2, vocab=400, seq_length=96, iters=8, global_batch=8,
              conversations=120)


def _say(step: int, total: int, text: str) -> None:
    print(f"\n[{step}/{total}] {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split_data(src: Path, out: Path, *, limit: int | None, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl / valid.jsonl (90 / 10) from one JSONL file (valid: for the final check)."""
    lines = [line for line in src.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    if limit:
        lines = lines[:limit]
    n_valid = max(1, len(lines) // 10)
    out.mkdir(parents=True, exist_ok=True)
    (out / "valid.jsonl").write_text("\n".join(lines[:n_valid]) + "\n")
    (out / "train.jsonl").write_text("\n".join(lines[n_valid:]) + "\n")
    return out / "train.jsonl", out / "valid.jsonl"


def _train(args, sizes: Sizes, ckpt: Path, data: Path, run: Path) -> list[dict]:
    """Megatron-LM's --valid-data-path cannot be combined with --data-path in 0.19, so the
    evaluation runs on (the stored order of) the training data."""
    import torch

    cuda = torch.cuda.is_available()
    nproc = args.nproc or args.tp * args.pp
    if cuda and nproc > torch.cuda.device_count():
        raise SystemExit(f"eaft-megatron demo: {nproc} processes (--tp {args.tp} x --pp {args.pp}) "
                         f"need {nproc} GPUs, found {torch.cuda.device_count()}")
    if nproc % (args.tp * args.pp):
        raise SystemExit(f"eaft-megatron demo: --nproc {nproc} is not a multiple of "
                         f"--tp x --pp = {args.tp * args.pp}")
    micro = max(1, sizes.global_batch // max(1, nproc // (args.tp * args.pp)) // 4)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "eaft_megatron.train",
        "--load", str(ckpt), "--save", str(run), "--data-path", str(data),
        "--tensor-model-parallel-size", str(args.tp),
        "--pipeline-model-parallel-size", str(args.pp),
        "--micro-batch-size", str(micro), "--global-batch-size", str(sizes.global_batch),
        "--train-iters", str(args.iters or sizes.iters), "--lr", str(args.lr),
        "--min-lr", str(args.lr / 10), "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, (args.iters or sizes.iters) // 10)),
        "--weight-decay", "0.0", "--clip-grad", "1.0",
        "--eval-interval", str(args.iters or sizes.iters), "--eval-iters", "2",
        "--log-interval", str(max(1, (args.iters or sizes.iters) // 10)),
        "--save-interval", str(args.iters or sizes.iters), "--ckpt-format", "torch_dist",
        "--loss-type", args.loss_type, "--num-workers", "0",
    ]
    if cuda:
        cmd.append("--bf16")
    print("  $ " + " ".join(cmd[:1] + ["-m", "torch.distributed.run"] + cmd[3:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONWARNINGS="ignore")
    log = run.parent / "train.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
        for line in proc.stdout:
            f.write(line)
            if summary := _summarise_log_line(line):
                print("  " + summary, flush=True)
        proc.wait()
    if proc.returncode != 0:
        errors = [x for x in log.read_text().splitlines() if "Error" in x][-5:]
        raise RuntimeError(f"training failed (exit {proc.returncode}), see {log}:\n"
                           + "\n".join(errors))
    metrics = run / "metrics.jsonl"
    return [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []


_LOG_FIELDS = ("lm loss", "sft loss", "dft loss", "eaft loss", "gate weight", "entropy",
               "confident conflicts", "elapsed time per iteration (ms)")


def _summarise_log_line(line: str) -> str | None:
    """A short form of Megatron's training / validation log lines (or None to skip a line)."""
    import re

    if "Error" in line:
        return line.rstrip()
    if (m := re.search(r"iteration\s+(\d+)/\s*(\d+) \|", line)) and "consumed samples" in line:
        head = f"iteration {m.group(1)}/{m.group(2)}"
    elif m := re.search(r"validation loss at iteration (\d+)( on validation set)?", line):
        head = f"{'final ' if m.group(2) else ''}evaluation @ {m.group(1)}"
    else:
        return None
    parts = [head]
    for field in _LOG_FIELDS:
        if v := re.search(re.escape(field) + r"(?: value)?:\s*([-+0-9.Ee]+)", line):
            name = "ms/iter" if field.startswith("elapsed") else field
            parts.append(f"{name} {float(v.group(1)):.4g}")
    return " | ".join(parts)


def _check_hf(hf_dir: Path, ckpt: Path, data_file: Path) -> dict:
    """Load with transformers, generate, and compare logits with the Megatron model's."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    first = json.loads(data_file.read_text().splitlines()[0])["messages"]
    prompt = [m for m in first if m["role"] != "assistant"][:2]
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        hf_logits = model(ids).logits[0]
    reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    megatron_logits = _megatron_logits(ckpt, ids)[0, :, : hf_logits.shape[-1]]
    err = (megatron_logits - hf_logits).abs().max().item()
    return dict(prompt=prompt[-1]["content"], reply=reply, max_logit_diff=err)


def _megatron_logits(ckpt: Path, ids):
    """Logits of the trained Megatron checkpoint (TP=1, this process) on ``ids`` [1, s]."""
    import torch

    from ..compat import cpu_transformer_config_kwargs
    from ..convert.convert import EMBEDDING_KEY, find_hf_config_dir, load_hf_config
    from ..convert.megatron_ckpt import (
        checkpoint_tensor_shapes, find_iteration_dir, load_model_weights, megatron_process_group,
    )
    from ..models import build_gpt_model

    iter_dir = find_iteration_dir(ckpt)
    hf_config = load_hf_config(find_hf_config_dir(ckpt, None))
    padded = checkpoint_tensor_shapes(iter_dir)[EMBEDDING_KEY][0][0]
    with megatron_process_group():
        kwargs = cpu_transformer_config_kwargs() if not torch.cuda.is_available() else {}
        model = build_gpt_model(hf_config, padded_vocab=padded, transformer_impl="local",
                                **{**kwargs, "params_dtype": torch.float32})
        load_model_weights([model], iter_dir)
        model.eval()
        s = ids.shape[1]
        with torch.no_grad():
            return model(ids, torch.arange(s).unsqueeze(0), None)


def _quiet_known_notices() -> None:
    """The demo narrates its own steps: hide megatron-core's import-time notices about optional
    GPU packages (apex, transformer-engine), its deprecation notices, and torch's "no CUDA
    runtime" line, which say nothing about this run. Errors still show."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|torch\.distributed)\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("torch.utils.cpp_extension", "megatron.core"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_demo(args: argparse.Namespace) -> dict:
    _quiet_known_notices()
    sizes = QUICK if args.quick else FULL
    work = Path(args.workdir).resolve()
    if work.exists() and any(work.iterdir()):
        if not args.force:
            raise SystemExit(f"eaft-megatron demo: {work} is not empty (use --force)")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    total = 6
    from ..convert import hf_to_megatron, megatron_to_hf
    from ..data import preprocess

    data_src = Path(args.data) if args.data else BUNDLED_DATA
    if args.hf_model:
        _say(1, total, f"Using your Hugging Face model {args.hf_model}")
        hf_dir = Path(args.hf_model)
    else:
        _say(1, total, f"Making a small Qwen3 model in Hugging Face format "
                       f"(hidden {sizes.hidden}, {sizes.layers} layers, BPE vocabulary "
                       f"{sizes.vocab} trained on {data_src.name}) -> {work / 'hf_model'}")
        hf_dir = train_tokenizer(data_src, work / "hf_model", vocab_size=sizes.vocab)
        make_qwen3_model(hf_dir, vocab_size=sizes.vocab, hidden=sizes.hidden,
                         layers=sizes.layers)

    _say(2, total, f"Converting it to a Megatron-Core checkpoint (torch_dist, TP={args.tp}, "
                   f"PP={args.pp}) -> {work / 'mcore'}")
    ckpt = hf_to_megatron(hf_dir, work / "mcore", tp=args.tp, pp=args.pp, progress=True)

    _say(3, total, f"Preparing the chat data {data_src} (assistant-only loss masks, "
                   f"--seq-length {sizes.seq_length}) -> {work / 'data'}")
    train_jsonl, valid_jsonl = _split_data(data_src, work / "data" / "jsonl",
                                           limit=sizes.conversations)
    summaries = {"train": preprocess([train_jsonl], output_prefix=work / "data" / "train",
                                     seq_length=sizes.seq_length, tokenizer=hf_dir,
                                     workers=1 if args.quick else 2, progress=not args.quick)}
    s = summaries["train"]
    print("  " + ", ".join(f"{k.replace('_', ' ')} {s[k]}" for k in (
        "documents", "tokens", "supervised_tokens", "truncated", "skipped") if k in s))

    _say(4, total, f"Training with {args.loss_type.upper()} through Megatron's own loop "
                   f"(torchrun, TP={args.tp} x PP={args.pp}) -> {work / 'run'}")
    records = _train(args, sizes, ckpt, work / "data" / "train", work / "run")
    train_recs = [r for r in records if r.get("kind") == "train"]
    if train_recs:
        a, b = train_recs[0], train_recs[-1]
        print(f"  loss {a.get('loss'):.4f} (iteration {a.get('iteration')}) -> "
              f"{b.get('loss'):.4f} (iteration {b.get('iteration')}); "
              f"mean gate weight {b.get('gate_weight', float('nan')):.3f}")

    _say(5, total, f"Converting the trained checkpoint back to Hugging Face -> {work / 'hf_sft'}")
    hf_out = megatron_to_hf(work / "run", work / "hf_sft", progress=True)

    _say(6, total, "Loading it with transformers, generating, comparing logits with Megatron")
    check = _check_hf(hf_out, work / "run", valid_jsonl)
    print(f"  prompt: {check['prompt']!r}\n  reply:  {check['reply']!r}\n"
          f"  max |logits(transformers) - logits(Megatron)| = {check['max_logit_diff']:.2e}")
    elapsed = time.perf_counter() - started
    result = dict(workdir=str(work), hf_model=str(hf_dir), checkpoint=str(ckpt),
                  data_summary=summaries, metrics=records, hf_export=str(hf_out), check=check,
                  seconds=round(elapsed, 1))
    (work / "demo_result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nDone in {elapsed:.0f} s. Everything is under {work} (summary: demo_result.json).")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="eaft-demo", help="output directory (default ./eaft-demo)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --workdir")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few iterations")
    p.add_argument("--hf-model", default=None, help="your HF model directory (with tokenizer)")
    p.add_argument("--data", default=None, help="your chat JSONL (default: the bundled one)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes, a multiple of tp x pp (default: tp x pp; the rest is "
                        "data parallel)")
    p.add_argument("--iters", type=int, default=None, help="training iterations")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--loss-type", choices=["sft", "dft", "eaft"], default="eaft")


def register_command(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline end to end on a small Qwen3 model")
    add_arguments(p)
    p.set_defaults(func=lambda a: (run_demo(a), 0)[1])
