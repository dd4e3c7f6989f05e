"""Benchmark: one training iteration of a small GPTModel, loss_type sft vs eaft, and its split.

    python benchmarks/bench_train.py                          # defaults below, CPU or GPU
    python benchmarks/bench_train.py --layers 2 --hidden 256 --vocab 32000 --seq 256 --mbs 2

One process, the model the trainer builds (``eaft_megatron.models.build_gpt_model`` from a
Qwen3-style HF config, local spec, fp32 on CPU / bf16 on GPU), the loss installed with
``eaft_megatron.megatron.install_eaft_loss`` exactly as ``eaft_megatron.train`` does.
Providers, switched on the same model (same weights, same batch) and interleaved (every
repetition visits them in a rotated order; the optimizer step is timed but not applied, so
every repetition sees the same weights):

=================  ==========================================================================
``megatron``       megatron-core's own ``vocab_parallel_cross_entropy`` (nothing installed)
``sft``            this package's kernel, w = 1, no statistics
``sft_stats``      ``sft`` plus the logged statistics (entropy, confident conflicts)
``eaft``           the EAFT gate and its statistics: what ``--loss-type eaft`` trains with
=================  ==========================================================================

Split: ``forward`` (embedding to output-layer logits, timed by module hooks), ``loss`` (the
installed ``compute_language_model_loss`` and the per-token reduction), ``backward``,
``optimizer`` (Adam, timed on a copy of the gradients' step, not applied). The table reports
medians (and the fastest iteration, the number least disturbed by other load) and the
iteration time relative to ``sft``; results go to
``benchmarks/results/train_<device>.csv`` (written atomically).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROVIDERS = ("megatron", "sft", "sft_stats", "eaft")


def hf_config(args):
    import transformers

    return transformers.Qwen3Config(
        architectures=["Qwen3ForCausalLM"], vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128),
        head_dim=64, max_position_embeddings=args.seq, tie_word_embeddings=False,
        rope_theta=1e6, rms_norm_eps=1e-6)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--mbs", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    from eaft_megatron.compat import cpu_transformer_config_kwargs, install_cpu_compat
    from eaft_megatron.megatron import (EAFTLossConfig, install_eaft_loss, reduce_eaft_loss,
                                        uninstall_eaft_loss)
    from eaft_megatron.models import build_gpt_model
    from megatron.core import parallel_state, tensor_parallel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if not cuda:
        install_cpu_compat()
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    overrides = cpu_transformer_config_kwargs() if not cuda else dict(
        params_dtype=torch.bfloat16, bf16=True)
    hf = hf_config(args)
    model = build_gpt_model(hf, transformer_impl="local", **overrides).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    gen = torch.Generator().manual_seed(0)
    b, s = args.mbs, args.seq
    tokens = torch.randint(0, args.vocab, (b, s), generator=gen).to(device)
    labels = torch.randint(0, args.vocab, (b, s), generator=gen)
    labels[:, : s // 4] = -100  # prompts are not supervised
    loss_mask = (labels != -100).float().to(device)
    labels = labels.to(device)
    positions = torch.arange(s, device=device).expand(b, s)

    marks: dict[str, float] = {}
    model.embedding.register_forward_pre_hook(lambda *_: marks.__setitem__("start", _now()))
    model.output_layer.register_forward_hook(lambda *_: marks.__setitem__("logits", _now()))

    def _now() -> float:
        sync(device)
        return time.perf_counter()

    configs = {"sft": EAFTLossConfig(loss_type="sft", stats=False),
               "sft_stats": EAFTLossConfig(loss_type="sft"),
               "eaft": EAFTLossConfig(loss_type="eaft")}

    def step(provider: str) -> dict[str, float]:
        uninstall_eaft_loss(model)
        if provider != "megatron":
            install_eaft_loss(model, configs[provider])
        model.zero_grad(set_to_none=True)
        output = model(tokens, positions, None, labels=labels.clamp(min=0)
                       if provider == "megatron" else labels)
        loss_sum, num_tokens, _ = reduce_eaft_loss(loss_mask, output, configs.get(provider))
        loss = loss_sum / num_tokens
        t_loss = _now()
        loss.backward()
        t_bwd = _now()
        saved = copy.deepcopy(optimizer.state_dict())
        params = [p.detach().clone() for p in model.parameters()]
        t0 = _now()
        optimizer.step()
        t_opt = _now()
        with torch.no_grad():  # keep the weights fixed: every repetition is the same iteration
            for p, q in zip(model.parameters(), params):
                p.copy_(q)
        optimizer.load_state_dict(saved)
        return dict(forward=marks["logits"] - marks["start"], loss=t_loss - marks["logits"],
                    backward=t_bwd - t_loss, optimizer=t_opt - t0,
                    iteration=(t_loss - marks["start"]) + (t_bwd - t_loss) + (t_opt - t0))

    times: dict[str, list[dict[str, float]]] = {p: [] for p in PROVIDERS}
    for rep in range(args.warmup + args.reps):
        order = PROVIDERS[rep % len(PROVIDERS):] + PROVIDERS[: rep % len(PROVIDERS)]
        for provider in order:
            result = step(provider)
            if rep >= args.warmup:
                times[provider].append(result)

    def med(provider, key):
        return statistics.median(t[key] for t in times[provider]) * 1e3

    base = med("sft", "iteration")
    rows = []
    for provider in PROVIDERS:
        rows.append(dict(
            device=device.type, layers=args.layers, hidden=args.hidden, vocab=args.vocab,
            tokens=b * s, provider=provider, reps=args.reps,
            iteration_ms=round(med(provider, "iteration"), 2),
            iteration_min_ms=round(min(t["iteration"] for t in times[provider]) * 1e3, 2),
            forward_ms=round(med(provider, "forward"), 2),
            loss_ms=round(med(provider, "loss"), 2),
            backward_ms=round(med(provider, "backward"), 2),
            optimizer_ms=round(med(provider, "optimizer"), 2),
            iteration_vs_sft=round(med(provider, "iteration") / base, 4),
        ))
    cols = ["provider", "iteration_ms", "iteration_min_ms", "forward_ms", "loss_ms", "backward_ms",
            "optimizer_ms", "iteration_vs_sft"]
    print(f"\n{device.type} {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.layers} layers x hidden {args.hidden}, vocab {args.vocab}, "
          f"{b}x{s} tokens, {args.reps} interleaved repetitions (medians)\n")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_{device.type}.csv"
    with open(f"{path}.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(f"{path}.tmp", path)
    print(f"\nwrote {path}")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
