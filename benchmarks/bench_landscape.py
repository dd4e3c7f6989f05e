"""Cost of ``--eaft-landscape`` on an evaluation pass (CPU or GPU, one process).

    python benchmarks/bench_landscape.py [--tokens 512] [--vocab 32000] [--reps 15]

The landscape's share of an evaluation pass. An evaluation micro-batch = the model's forward
(a Qwen3 of 2 layers, hidden 256, built by ``transformers``: the same small model as
bench_train, where the loss weighs most) + this
package's loss op with statistics. With the landscape, the collector's per-micro-batch work
(:class:`eaft_megatron.train.landscape_stats._Accumulator`) is added, and its end-of-evaluation
buffer is built once per evaluation (``--micro-batches`` micro-batches). Interleaved
repetitions, medians. The collective (one gather of that buffer) is not timed here: it is one
call of ``--landscape-buffer`` bytes per evaluation. Writing the files is reported apart (once per
evaluation, on one rank). Results: ``benchmarks/results/landscape_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512, help="tokens per micro-batch")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--reps", type=int, default=15)
    a = parser.parse_args()
    import transformers

    from eaft_megatron.ops import vocab_parallel_eaft_cross_entropy
    from eaft_megatron.train.landscape_stats import _Accumulator, unpack_buffers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=a.vocab, hidden_size=256, intermediate_size=768,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=4096, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config).to(device).eval()
    b, s = 2, a.tokens // 2
    ids = torch.randint(0, a.vocab, (b, s), device=device)
    labels = torch.randint(0, a.vocab, (b, s), device=device)
    labels[:, : s // 4] = -100
    cu = torch.tensor([[0, s // 3, s // 2, s] + [s] * (s - 3)] * b, dtype=torch.int32)
    first = torch.tensor([0, 3])

    def forward():
        with torch.no_grad():
            logits = model(ids).logits.transpose(0, 1).contiguous()  # [s, b, V]
            loss, stats = vocab_parallel_eaft_cross_entropy(logits, labels.t(), return_stats=True)
            float(loss.sum())
        return stats._replace(**{k: getattr(stats, k).t() for k in stats._fields})

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Interleaved, each part timed on its own (whole-evaluation timings on a shared machine are
    # far noisier than the few milliseconds the collector costs): per repetition, the evaluation
    # pass (micro-batches x (forward + loss)) and the collector's work on the same statistics
    # (micro-batches x add + the end-of-evaluation buffer).
    forward()
    base, land = [], []
    for _ in range(a.reps):
        acc = _Accumulator(20, 20, 0.15, 0.15)
        t_pass = t_land = 0.0
        for _ in range(a.micro_batches):
            sync()
            t0 = time.perf_counter()
            stats = forward()
            sync()
            t1 = time.perf_counter()
            acc.add(stats, cu, first)
            sync()
            t_pass += t1 - t0
            t_land += time.perf_counter() - t1
        t0 = time.perf_counter()
        acc.buffer(a.micro_batches * b * 3)
        t_land += time.perf_counter() - t0
        base.append(t_pass)
        land.append(t_land)

    def micro_batch(acc):
        acc.add(forward(), cu, first)

    acc = _Accumulator(20, 20, 0.15, 0.15)
    for _ in range(a.micro_batches):
        micro_batch(acc)
    buf = acc.buffer(a.micro_batches * b * 3)
    merged = unpack_buffers([buf], 20, a.micro_batches * b * 3)
    from eaft_megatron.train import landscape as ls

    args = SimpleNamespace(load=None, loss_type="eaft", eaft_top_k=20, eaft_entropy="topk",
                           eaft_conflict_entropy=0.15, eaft_conflict_prob=0.15,
                           eaft_landscape_top=0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        record = ls.landscape_record(merged, args=args, hf_dir=tmp, data=tmp, iteration=0,
                                     final=True)
        Path(tmp, "landscape.json").write_text(json.dumps(record))
        t_json = time.perf_counter() - t0
        t0 = time.perf_counter()
        ls.plot_landscapes([record], Path(tmp, "x.png"))
        t_png = time.perf_counter() - t0
    mb, ml = statistics.median(base), statistics.median(land)
    result = dict(device=str(device), tokens_per_micro_batch=a.tokens, vocab=a.vocab,
                  micro_batches=a.micro_batches, reps=a.reps,
                  evaluation_ms=round(1000 * mb, 2), landscape_ms=round(1000 * ml, 2),
                  overhead=round(ml / mb, 4),
                  fastest_overhead=round(min(land) / min(base), 4),
                  buffer_bytes=int(buf.nbytes), write_json_ms=round(1000 * t_json, 1),
                  write_png_ms=round(1000 * t_png, 1))
    print(json.dumps(result, indent=1))
    out = Path(__file__).resolve().parent / "results" / f"landscape_{device.type}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
