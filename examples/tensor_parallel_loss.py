"""The EAFT loss on vocab-parallel logits, as a Megatron-Core model produces them.

    torchrun --nproc-per-node 2 examples/tensor_parallel_loss.py            # CPU: gloo
    torchrun --nproc-per-node 8 examples/tensor_parallel_loss.py --tokens 8192 --vocab 151936

Each rank holds its [s, b, V/tp] shard of the logits (as ``GPTModel`` with
``parallel_output=True`` returns them); the loss never gathers them. The script also recomputes
the loss on rank 0 from the full logits with tp=1 and prints the difference.
"""

import argparse
import os

import torch
import torch.distributed as dist

from eaft_megatron import vocab_parallel_eaft_cross_entropy


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--loss-type", default="eaft", choices=["sft", "dft", "eaft"])
    p.add_argument("--entropy", default="topk", choices=["topk", "full"])
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda
              else torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(device)

    # Same full logits on every rank (same seed); rank r keeps its vocabulary slice.
    gen = torch.Generator().manual_seed(0)
    s, b = args.tokens // 2, 2
    full = (torch.randn(s, b, args.vocab, generator=gen) * 3).bfloat16()
    target = torch.randint(0, args.vocab, (s, b), generator=gen)
    target[: s // 4] = -100  # e.g. prompt tokens: not supervised
    vl = args.vocab // tp
    shard = full[..., rank * vl : (rank + 1) * vl].to(device).requires_grad_()

    loss, stats = vocab_parallel_eaft_cross_entropy(
        shard, target.to(device), loss_type=args.loss_type, entropy=args.entropy,
        tp_group=dist.group.WORLD, return_stats=True,
    )
    mean_loss = loss.sum() / stats.mask.sum()  # Megatron's per-token normalisation
    mean_loss.backward()

    if rank == 0:
        m = stats.mask
        print(f"tp={tp} tokens={s * b} vocab={args.vocab} loss_type={args.loss_type} "
              f"entropy={args.entropy}")
        print(f"loss {mean_loss.item():.6f}  mean gate {stats.weight[m].mean().item():.4f}  "
              f"mean entropy {stats.entropy[m].mean().item():.4f}  "
              f"mean p(label) {stats.target_prob[m].mean().item():.4f}")
        ref = vocab_parallel_eaft_cross_entropy(
            full.to(device), target.to(device), loss_type=args.loss_type, entropy=args.entropy,
        )  # tp_group=None without Megatron's parallel_state: no tensor parallelism
        print(f"max |loss(tp={tp}) - loss(tp=1)| = {(ref - loss).abs().max().item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
