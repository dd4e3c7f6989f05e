"""Benchmark: SFT preprocessing throughput, worker processes vs a single-process loop.

    python benchmarks/bench_preprocess.py                       # 100k conversations, workers 2
    python benchmarks/bench_preprocess.py --conversations 20000 --workers 1,2,4

Everything is generated here, offline: a byte-level BPE (vocabulary 8000) trained on synthetic
text and saved as a Hugging Face tokenizer directory with a ChatML (Qwen-style) chat template,
and ``--conversations`` synthetic chats (optional system prompt, 1-3 user/assistant turns of
5-120 words). Rows:

- ``loop``: the reference, one process: ``parse_line`` + ``encode_record`` over every line with
  the same tokenizer, nothing written (the work a naive script does).
- ``workers=N``: the whole ``preprocess`` (reading, N tokenizer processes, writing the indexed
  dataset and summary), end to end; ``--pack`` rows pack into ``--seq-length``.

tokens/s counts the tokens written; ``speedup`` is tokens/s over the loop's (median loop time
with ``--rounds`` > 1). ``cpu_s`` is the CPU time spent (parent and workers): with no other
load, ``workers=N`` takes about ``max(cpu_s / N, parent's share)`` seconds. The machine's load
average is recorded with every row: on a shared machine other processes take cores from the
workers, and wall-clock speedups then understate what the code does. Results go to
``benchmarks/results/preprocess.csv`` (written atomically).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def lexicon(rng: random.Random, size: int = 4000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "qu", "st"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(size)]


def sentence(rng: random.Random, words: list[str], n: int) -> str:
    out = " ".join(rng.choice(words) for _ in range(n))
    return out[0].upper() + out[1:] + "."


def build_tokenizer(path: Path, words: list[str], rng: random.Random) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((sentence(rng, words, 30) for _ in range(20000)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(path))
    return path


def write_conversations(path: Path, n: int, words: list[str], rng: random.Random) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            messages = []
            if rng.random() < 0.3:
                messages.append({"role": "system", "content": sentence(rng, words, 8)})
            for _ in range(rng.randint(1, 3)):
                user = sentence(rng, words, rng.randint(5, 60))
                messages.append({"role": "user", "content": user})
                messages.append({"role": "assistant",
                                 "content": sentence(rng, words, rng.randint(5, 120))})
            f.write(json.dumps({"messages": messages}) + "\n")


def single_process_loop(path: Path, tokenizer_dir: Path) -> tuple[float, float, int, int]:
    from eaft_megatron.data import encode_record, load_tokenizer, parse_line

    tok = load_tokenizer(tokenizer_dir)
    start, cpu = time.perf_counter(), time.process_time()
    docs = tokens = 0
    with open(path, "rb") as f:
        for line in f:
            ids, _ = encode_record(parse_line(line)[1], tok)
            docs += 1
            tokens += ids.size
    return time.perf_counter() - start, time.process_time() - cpu, docs, tokens


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--workers", default="2", help="comma-separated worker counts")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--pack", action="store_true", help="also time --pack runs")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every mode, interleaved")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    from eaft_megatron.data import preprocess

    rng = random.Random(0)
    words = lexicon(rng)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        tok_dir = build_tokenizer(tmp / "tokenizer", words, rng)
        data = tmp / "chat.jsonl"
        t0 = time.perf_counter()
        write_conversations(data, args.conversations, words, rng)
        print(f"generated {args.conversations} conversations "
              f"({data.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f}s")

        runs = [(int(w), False) for w in args.workers.split(",")]
        runs += [(int(w), True) for w in args.workers.split(",")] if args.pack else []
        for _ in range(args.rounds):  # interleaved, so a change of machine load hits every mode
            load = os.getloadavg()[0]
            seconds, cpu, docs, tokens = single_process_loop(data, tok_dir)
            rows.append(dict(mode="loop", workers=1, pack=False, conversations=docs,
                             tokens=tokens, seconds=round(seconds, 2), cpu_seconds=round(cpu, 2),
                             load_avg=round(load, 2)))
            for workers, pack in runs:
                load = os.getloadavg()[0]
                t0, cpu0 = time.perf_counter(), cpu_seconds()
                s = preprocess([data], tokenizer=tok_dir, output_prefix=tmp / f"o{workers}{pack}",
                               seq_length=args.seq_length, pack=pack, workers=workers,
                               progress=False)
                rows.append(dict(mode=f"workers={workers}", workers=workers, pack=pack,
                                 conversations=s["documents"], tokens=s["tokens"],
                                 seconds=round(time.perf_counter() - t0, 2),
                                 cpu_seconds=round(cpu_seconds() - cpu0, 2),
                                 load_avg=round(load, 2)))
    loops = sorted(r["seconds"] for r in rows if r["mode"] == "loop")
    base = rows[0]["tokens"] / loops[len(loops) // 2]  # median loop time
    for row in rows:
        row["conversations_per_s"] = round(row["conversations"] / row["seconds"])
        row["tokens_per_s"] = round(row["tokens"] / row["seconds"])
        row["speedup"] = round(row["tokens_per_s"] / base, 2)
        row.update(cpus=len(os.sched_getaffinity(0)), machine=platform.node(),
                   date=time.strftime("%Y-%m-%d %H:%M"))

    print(f"\n{len(os.sched_getaffinity(0))} CPUs, {platform.processor() or platform.machine()}"
          " (load_avg: 1-minute load average when the row started; other processes count)")
    print(f"{'mode':<12}{'pack':>6}{'conversations':>15}{'tokens':>13}{'seconds':>9}"
          f"{'cpu_s':>8}{'conv/s':>9}{'tokens/s':>11}{'speedup':>9}{'load_avg':>10}")
    for r in rows:
        print(f"{r['mode']:<12}{str(r['pack']):>6}{r['conversations']:>15}{r['tokens']:>13}"
              f"{r['seconds']:>9.2f}{r['cpu_seconds']:>8.2f}{r['conversations_per_s']:>9}"
              f"{r['tokens_per_s']:>11}{r['speedup']:>8.2f}x{r['load_avg']:>10.2f}")

    os.makedirs(args.out, exist_ok=True)
    target = os.path.join(args.out, "preprocess.csv")
    with open(target + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(target + ".tmp", target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
