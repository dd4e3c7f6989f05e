"""``eaft-megatron demo``: the whole pipeline end to end, on any machine, with no download.

    eaft-megatron demo                               # CPU: ~4 min on 2 cores, into ./eaft-demo
    eaft-megatron demo --quick --workdir /tmp/d      # tiny sizes (the test uses this)
    eaft-megatron demo --hf-model DIR --data a.jsonl --tp 2 --iters 200   # your model and data
    eaft-megatron demo --hf-model MOE_DIR --tp 1 --ep 2   # a mixture of experts, 2 expert ranks

Steps (each says what it does and where its output is):
 1. a small Qwen3 model in Hugging Face format (a BPE tokenizer trained on the bundled chat data
    and a randomly initialised ``Qwen3ForCausalLM``), unless ``--hf-model`` is given (any
    supported architecture, mixtures of experts included: ``--ep`` spreads the experts);
 2. ``convert hf-to-megatron`` at ``--tp`` (default 2) of the demo's own model; a
    ``--hf-model`` is not converted: the trainer reads it directly, each rank only its own
    slices of the safetensors (``--pretrained-checkpoint HF_DIR``, ``train/hf_load.py``);
 3. ``preprocess`` of the bundled chat dataset (or ``--data``): assistant-only loss masks, one
    conversation per sample (not packed: what the trainer needs for gated-DeltaNet hybrids
    such as Qwen3.5 on CPU, whose recurrent state would otherwise cross conversations);
 4. the trainer, ``torchrun -m eaft_megatron.train`` with EAFT on ``--tp x --pp x --ep`` ranks
    (``$EAFT_TORCHRUN`` instead of torchrun when set; gloo and fp32 on CPU; NCCL and bf16 on
    GPU), validating on held-out conversations (no prompt of them is in the training data),
    narrated from ``metrics.jsonl``; ``run/curves.png`` and
    ``run/tensorboard`` show the curves; the entropy-probability landscape of the held-out data
    before and after training (evaluation-only runs of the trainer on the same held-out samples:
    ``landscape/before``, ``landscape/after``, ``landscape/comparison.png``) with the share of
    confident conflicts (``--no-landscape`` skips those two runs);
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


def _split_data(src: Path, out: Path, *, limit: int | None, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl / valid.jsonl (90 / 10) from one JSONL file. Conversations are grouped by
    their prompt (the non-assistant messages) before the split, so a validation prompt never
    occurs in the training data, also when the source repeats conversations."""
    groups: dict[str, list[str]] = {}
    for line in src.read_text().splitlines():
        if line.strip():
            messages = json.loads(line).get("messages", [])
            key = json.dumps([m for m in messages if m.get("role") != "assistant"])
            groups.setdefault(key, []).append(line)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    if limit:  # about `limit` conversations
        kept, count = [], 0
        for key in keys:
            if count >= limit:
                break
            kept.append(key)
            count += len(groups[key])
        keys = kept
    n_valid = max(1, len(keys) // 10)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("valid", keys[:n_valid]), ("train", keys[n_valid:])):
        lines = [line for key in part for line in groups[key]]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out / "train.jsonl", out / "valid.jsonl"


def _sample_count(summary: dict) -> int:
    """Training samples in a prepared dataset (packs, or one per conversation)."""
    return int(summary.get("sequences") or summary["documents"])


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _nproc(args) -> int:
    """Trainer processes: ``--nproc``, by default one per model shard (tp x pp x ep)."""
    return args.nproc or args.tp * args.pp * args.ep


def _layout(args) -> str:
    return f"TP={args.tp} x PP={args.pp}" + (f" x EP={args.ep}" if args.ep > 1 else "")


def _ep_flags(args) -> list[str]:
    return ["--expert-model-parallel-size", str(args.ep)] if args.ep > 1 else []


def _torchrun() -> list[str]:
    """The command that launches the trainer's ranks: ``$EAFT_TORCHRUN`` (a site's wrapper)
    when set, otherwise this interpreter's ``torch.distributed.run``
    (:func:`eaft_megatron.train.launch.torchrun_command`)."""
    from ..train.launch import torchrun_command

    try:
        return torchrun_command()
    except ValueError as e:
        raise DemoError(str(e)) from None


def _trainer_command(args, sizes: Sizes, *flags: str) -> list[str]:
    """torchrun of ``python -m eaft_megatron.train`` with the demo's parallel layout, batch
    sizes, loss and device settings, then ``flags`` (what the run is for)."""
    import torch

    from ..compat.processes import free_port

    nproc = _nproc(args)
    micro = max(1, sizes.global_batch // max(1, nproc // (args.tp * args.pp)) // 4)
    return [
        *_torchrun(), "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "eaft_megatron.train", *flags,
        "--tensor-model-parallel-size", str(args.tp),
        "--pipeline-model-parallel-size", str(args.pp),
        "--micro-batch-size", str(micro), "--global-batch-size", str(sizes.global_batch),
        "--loss-type", args.loss_type, "--num-workers", "0",
    ] + _ep_flags(args) + (["--bf16"] if torch.cuda.is_available() else [])


def _trainer_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                PYTHONWARNINGS="ignore")


class DemoError(Exception):
    """A mistake in the demo's command line or inputs: one line, exit 2, nothing left behind."""


#: written into --workdir when the demo creates it: a later demo may replace that folder
MARKER = ".eaft-demo"


def _check_layout(args, config, where: str) -> str:
    """The model's architecture, once the parallel sizes are checked against it (one line
    naming the problem, before any work)."""
    from ..models import check_parallel_sizes, get_arch

    try:
        arch = get_arch(config)
        check_parallel_sizes(config, args.tp, args.pp, args.ep)
    except ValueError as e:
        raise DemoError(f"{where}: {e}") from None
    nproc = _nproc(args)
    if nproc % (args.tp * args.pp * args.ep):
        raise DemoError(f"--nproc {nproc} is not a multiple of --tp x --pp x --ep = "
                        f"{args.tp * args.pp * args.ep}")
    return arch.hf_architecture


def _landscape_eval(args, sizes: Sizes, ckpt: Path, valid: Path, valid_samples: int,
                    out: Path) -> dict | None:
    """An evaluation-only run of the trainer on ``ckpt`` (the model before training, converted
    or a HF directory, the trained run after): its entropy-probability landscape on the
    held-out conversations (the same samples both times), into ``out``."""
    cmd = _trainer_command(
        args, sizes, "--load", str(ckpt), "--data-path", str(valid), "--eval-only",
        "--eval-iters", str(max(1, valid_samples // sizes.global_batch)),
        "--log-dir", str(out.parent), "--eaft-landscape", str(out))
    env = _trainer_env()
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        print(f"  (the evaluation-only run failed, exit {proc.returncode}; see {log})")
        return None
    return json.loads((out / "landscape.json").read_text())


def _train(args, sizes: Sizes, ckpt: Path, data: Path, valid: Path, valid_samples: int,
           run: Path, landscape: Path | None = None) -> list[dict]:
    """torchrun the trainer with Megatron-LM's restart idiom (``--load RUN --save RUN
    --pretrained-checkpoint CKPT``), evaluating on the held-out conversations; narrate from
    ``metrics.jsonl`` while it runs."""
    import torch

    cuda = torch.cuda.is_available()
    nproc = _nproc(args)
    if cuda and nproc > torch.cuda.device_count():
        raise DemoError(f"{nproc} processes ({_layout(args)}) need {nproc} GPUs, found "
                        f"{torch.cuda.device_count()}")
    iters = args.iters or sizes.iters
    eval_iters = max(1, valid_samples // sizes.global_batch)  # the held-out set, once
    flags = [
        "--load", str(run), "--save", str(run), "--pretrained-checkpoint", str(ckpt),
        "--train-data-path", str(data), "--valid-data-path", str(valid),
        "--train-iters", str(iters), "--lr", str(args.lr),
        "--min-lr", str(args.lr / 10), "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, iters // 10)),
        "--weight-decay", "0.0", "--clip-grad", "1.0",
        "--eval-interval", str(max(1, iters // 3)), "--eval-iters", str(eval_iters),
        "--log-interval", str(max(1, iters // 10)),
        "--save-interval", str(iters), "--ckpt-format", "torch_dist",
    ] + (["--eaft-landscape", str(landscape)] if landscape is not None else [])
    if _have("tensorboard"):
        flags += ["--tensorboard-dir", str(run / "tensorboard"), "--tensorboard-log-interval",
                  str(max(1, iters // 10))]
    cmd = _trainer_command(args, sizes, *flags)
    print("  $ " + " ".join(cmd), flush=True)
    env = _trainer_env()
    log = run.parent / "train.log"
    metrics = run / "metrics.jsonl"
    seen = 0
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        while True:
            done = proc.poll() is not None
            records = _read_records(metrics)
            for record in records[seen:]:
                if line := _describe(record, iters):
                    print("  " + line, flush=True)
            seen = len(records)
            if done:
                break
            time.sleep(0.5)
    if proc.returncode != 0:
        lines = log.read_text().splitlines()
        errors = [x for x in lines if "error" in x.lower() and "_error" not in x][-5:]
        raise RuntimeError(f"training failed (exit {proc.returncode}), see {log}:\n"
                           + "\n".join(errors))
    return _read_records(metrics)


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return records


def _describe(record: dict, iters: int) -> str | None:
    """One narration line per metrics.jsonl record (see ``eaft_megatron.train.metrics``)."""
    kind = record.get("kind")
    if kind == "start":
        return f"start: {record.get('checkpoint') or 'random weights'} at iteration 0"
    if kind == "restart":
        return f"restart: resuming {record.get('checkpoint')} at iteration {record['iteration']}"
    if kind == "train":
        head = f"iteration {record['iteration']}/{iters}"
    elif kind in ("valid", "test"):
        head = (f"{'final ' if record.get('final') else ''}validation @ {record['iteration']} "
                "(held-out)")
    else:
        return None
    parts = [head]
    for key, label in (("lm_loss", "lm loss"), ("loss", f"{record.get('loss_type')} loss"),
                       ("gate_weight", "gate weight"), ("entropy", "entropy"),
                       ("confident_conflicts", "confident conflicts"),
                       ("load_balancing_loss", "load-balancing loss"),
                       ("expert_load_imbalance", "expert load max/mean")):
        if isinstance(record.get(key), (int, float)):
            parts.append(f"{label} {record[key]:.4g}")
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
    from ..checkpoint import (
        HF_DIR, checkpoint_tensor_shapes, find_hf_dir, find_iteration_dir, load_model_weights,
        megatron_process_group,
    )
    from ..convert.convert import EMBEDDING_KEY, load_hf_config
    from ..models import build_gpt_model

    iter_dir = find_iteration_dir(ckpt)
    hf_config = load_hf_config(find_hf_dir(ckpt) or ckpt / HF_DIR)
    padded = checkpoint_tensor_shapes(iter_dir)[EMBEDDING_KEY][0][0]
    with megatron_process_group():
        kwargs = cpu_transformer_config_kwargs() if not torch.cuda.is_available() else {}
        model = build_gpt_model(hf_config, padded_vocab=padded, transformer_impl="local",
                                **{**kwargs, "params_dtype": torch.float32})
        load_model_weights([model], iter_dir)
        model.eval()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)  # loaded weights may sit on the host
        s = ids.shape[1]
        with torch.no_grad():
            logits = model(ids.to(device), torch.arange(s, device=device).unsqueeze(0), None)
        return logits.float().cpu()


def _quiet_known_notices() -> None:
    """The demo narrates its own steps: hide megatron-core's import-time notices about optional
    GPU packages (apex, transformer-engine), its deprecation notices, torch's "no CUDA
    runtime" line, and transformers' note that a gated-DeltaNet model runs its PyTorch
    reference kernels (no fla / causal-conv1d on CPU), which say nothing about this run.
    Errors still show."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"(megatron|torch\.distributed)\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("torch.utils.cpp_extension", "megatron.core", "matplotlib",
                 "transformers.integrations.hub_kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _report_landscapes(root: Path, before: dict | None) -> dict:
    """Print the confident-conflict share before and after training; draw both side by side."""
    after_file = root / "after" / "landscape.json"
    after = json.loads(after_file.read_text()) if after_file.is_file() else None
    shares = {name: (r["confident_conflicts"] if r else None)
              for name, r in (("before", before), ("after", after))}
    if after is not None:
        print("  confident conflicts on the held-out data: "
              + (f"{100 * before['confident_conflicts']:.2f}% before -> " if before else "")
              + f"{100 * after['confident_conflicts']:.2f}% after training "
              f"(entropy < {after['thresholds']['entropy']} and p(label) < "
              f"{after['thresholds']['prob']}); most conflicting conversations: "
              f"{root / 'after' / 'samples.jsonl'}")
    from ..plots import have_matplotlib, plot_landscapes

    if before is not None and after is not None and have_matplotlib():
        plot_landscapes([before, after], root / "comparison.png")
        print(f"  landscapes: {root / 'comparison.png'}")
    return shares


def _checked_model(args, sizes: Sizes) -> str:
    """The architecture of the model the demo will train, its parallel layout checked (before
    anything is written)."""
    if args.hf_model:
        from ..convert.convert import load_hf_config

        hf_dir = Path(args.hf_model)
        try:
            config = load_hf_config(hf_dir)
        except (OSError, ValueError) as e:
            raise DemoError(f"--hf-model {hf_dir}: {e}") from None
        return _check_layout(args, config, f"--hf-model {hf_dir}")
    from .assets import qwen3_config

    return _check_layout(args, qwen3_config(vocab_size=sizes.vocab, hidden=sizes.hidden,
                                            layers=sizes.layers), "the demo's Qwen3 model")


def _take_workdir(work: Path, force: bool) -> None:
    """``work`` empty and marked as the demo's: an earlier demo's output (its marker) is
    replaced, another non-empty folder only with ``force``."""
    if work.exists() and not work.is_dir():
        raise DemoError(f"--workdir {work} is a regular file, not a directory")
    if work.is_dir() and any(work.iterdir()):
        if not (force or (work / MARKER).is_file()):
            raise DemoError(f"--workdir {work} is not empty and not an earlier demo's output "
                            f"(no {MARKER} in it): choose another --workdir, or --force to "
                            f"replace it")
        print(f"Replacing the earlier output in {work}", flush=True)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by eaft-megatron demo; a later demo replaces this folder\n")


def run_demo(args: argparse.Namespace) -> dict:
    """The demo (see the module doc). A :class:`DemoError` (a mistake found before or during
    the run) removes ``--workdir`` again; any other failure keeps it (its logs) for reading, and
    the next demo replaces it."""
    _quiet_known_notices()
    sizes = QUICK if args.quick else FULL
    work = Path(args.workdir).resolve()
    architecture = _checked_model(args, sizes)
    _torchrun()  # a malformed $EAFT_TORCHRUN is a mistake too, found before anything is written
    _take_workdir(work, args.force)
    try:
        return _run(args, sizes, work, architecture)
    except DemoError:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _run(args: argparse.Namespace, sizes: Sizes, work: Path, architecture: str) -> dict:
    started = time.perf_counter()
    total = 6
    from ..convert import hf_to_megatron, megatron_to_hf
    from ..data import preprocess

    data_src = Path(args.data) if args.data else BUNDLED_DATA
    if args.hf_model:
        hf_dir = Path(args.hf_model)
        _say(1, total, f"Using your Hugging Face model {hf_dir} ({architecture})")
    else:
        _say(1, total, f"Making a small Qwen3 model in Hugging Face format "
                       f"(hidden {sizes.hidden}, {sizes.layers} layers, BPE vocabulary "
                       f"{sizes.vocab} trained on {data_src.name}) -> {work / 'hf_model'}")
        hf_dir = train_tokenizer(data_src, work / "hf_model", vocab_size=sizes.vocab)
        make_qwen3_model(hf_dir, vocab_size=sizes.vocab, hidden=sizes.hidden,
                         layers=sizes.layers)

    if args.hf_model:  # the trainer reads it directly: no copy of a possibly large model
        _say(2, total, f"No conversion: the trainer reads {hf_dir} directly at "
                       f"{_layout(args)}, each rank only its own slices of the safetensors")
        ckpt = hf_dir
    else:
        _say(2, total, f"Converting it to a Megatron-Core checkpoint (torch_dist, "
                       f"TP={args.tp}, PP={args.pp}) -> {work / 'mcore'}")
        ckpt = hf_to_megatron(hf_dir, work / "mcore", tp=args.tp, pp=args.pp, progress=True)

    _say(3, total, f"Preparing the chat data {data_src} (assistant-only loss masks, one "
                   f"conversation per sample, --seq-length {sizes.seq_length}) -> {work / 'data'}")
    train_jsonl, valid_jsonl = _split_data(data_src, work / "data" / "jsonl",
                                           limit=sizes.conversations)
    summaries = {name: preprocess([jsonl], output_prefix=work / "data" / name,
                                  seq_length=sizes.seq_length, tokenizer=hf_dir,
                                  workers=1 if args.quick or name == "valid" else 2,
                                  progress=not args.quick, force=True)  # the demo's own
                 for name, jsonl in (("train", train_jsonl), ("valid", valid_jsonl))}
    for name, s in summaries.items():
        print(f"  {name}: " + ", ".join(f"{k.replace('_', ' ')} {s[k]}" for k in (
            "documents", "tokens", "supervised_tokens", "truncated", "skipped") if k in s))

    _say(4, total, f"Training with {args.loss_type.upper()} through Megatron's own loop "
                   f"(torchrun, {_layout(args)}), validating on the held-out "
                   f"conversations -> {work / 'run'}")
    run = work / "run"
    valid_samples = _sample_count(summaries["valid"])
    before = None if args.no_landscape else _landscape_eval(
        args, sizes, ckpt, work / "data" / "valid", valid_samples, work / "landscape" / "before")
    if before is not None:
        print(f"  before training (evaluation-only run): confident conflicts "
              f"{100 * before['confident_conflicts']:.2f}% of {before['tokens']} held-out "
              f"tokens -> {work / 'landscape' / 'before'}", flush=True)
    records = _train(args, sizes, ckpt, work / "data" / "train", work / "data" / "valid",
                     valid_samples, run)
    train_recs = [r for r in records if r.get("kind") == "train"]
    if train_recs:
        a, b = train_recs[0], train_recs[-1]
        print(f"  loss {a.get('loss'):.4f} (iteration {a.get('iteration')}) -> "
              f"{b.get('loss'):.4f} (iteration {b.get('iteration')}); "
              f"mean gate weight {b.get('gate_weight', float('nan')):.3f}")
    from ..plots import plot_curves

    curves = plot_curves(records, run / "curves.png",
                         f"{hf_dir.name}: {args.loss_type} on {data_src.name}")
    print(f"  metrics: {run / 'metrics.jsonl'}"
          + (f"; loss curves: {curves}" if curves else " (install matplotlib for curves.png)")
          + (f"; TensorBoard: tensorboard --logdir {run / 'tensorboard'}"
             if (run / "tensorboard").is_dir() else ""))

    landscapes = {}
    if not args.no_landscape:
        _landscape_eval(args, sizes, run, work / "data" / "valid", valid_samples,
                        work / "landscape" / "after")
        landscapes = _report_landscapes(work / "landscape", before)

    _say(5, total, f"Converting the trained checkpoint back to Hugging Face -> {work / 'hf_sft'}")
    hf_out = megatron_to_hf(run, work / "hf_sft", progress=True)

    _say(6, total, "Loading it with transformers, generating, comparing logits with Megatron")
    check = _check_hf(hf_out, run, valid_jsonl)
    print(f"  prompt: {check['prompt']!r}\n  reply:  {check['reply']!r}\n"
          f"  max |logits(transformers) - logits(Megatron)| = {check['max_logit_diff']:.2e}")
    elapsed = time.perf_counter() - started
    result = dict(workdir=str(work), hf_model=str(hf_dir), checkpoint=str(ckpt),
                  data_summary=summaries, metrics=records, hf_export=str(hf_out), check=check,
                  landscapes=landscapes,
                  seconds=round(elapsed, 1))
    (work / "demo_result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nDone in {elapsed:.0f} s. Everything is under {work} (summary: demo_result.json).")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="eaft-demo", help="output directory (default ./eaft-demo)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --workdir that is not an earlier demo's output (an "
                        "earlier demo's output is replaced without it)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few iterations")
    p.add_argument("--hf-model", default=None, help="your HF model directory (with tokenizer)")
    p.add_argument("--data", default=None, help="your chat JSONL (default: the bundled one)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size for a mixture-of-experts --hf-model (default 1)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes, a multiple of tp x pp x ep (default: tp x pp x ep; the "
                        "rest is data parallel)")
    p.add_argument("--iters", type=int, default=None, help="training iterations")
    p.add_argument("--no-landscape", action="store_true",
                   help="skip the evaluation-only runs (landscape before/after training)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--loss-type", choices=["sft", "dft", "eaft"], default="eaft",
                   help="the training loss (default eaft)")


def _command(args: argparse.Namespace) -> int:
    try:
        run_demo(args)
    except DemoError as e:
        print(f"eaft-megatron demo: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def register_command(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline end to end on a small Qwen3 model")
    add_arguments(p)
    p.set_defaults(func=_command)
