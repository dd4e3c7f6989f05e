"""Independent single-device oracle: plain PyTorch, float64, on the full (gathered) logits."""

from __future__ import annotations

import math

import torch


def reference_eaft(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    loss_type: str = "eaft",
    top_k: int = 20,
    alpha: float = 1.0,
    entropy: str = "topk",
    ignore_index: int = -100,
):
    """Per-token loss and stats of the whole family, straight from the definitions.

    Returns (loss, target_prob, entropy, weight); differentiable w.r.t. ``logits`` through
    ``CE`` only (the weight is detached, as the method prescribes).
    """
    z = logits.to(torch.float64)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    log_probs = torch.log_softmax(z, dim=-1)
    ce = -log_probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        p_target = torch.exp(-ce)
        if entropy == "topk":
            top = z.topk(min(top_k, z.shape[-1]), dim=-1).values
            q = torch.softmax(top, dim=-1)
            h = -(torch.xlogy(q, q)).sum(-1)
        else:
            probs = torch.softmax(z, dim=-1)
            h = -(torch.xlogy(probs, probs)).sum(-1)
        if loss_type == "sft":
            w = torch.ones_like(ce)
        elif loss_type == "dft":
            w = p_target**alpha
        else:
            w = torch.clamp(h / math.log(top_k), max=1.0) ** alpha
        w = torch.where(valid, w, torch.zeros_like(w))
    loss = torch.where(valid, w * ce, torch.zeros_like(ce))
    zero = torch.zeros_like(ce)
    return (
        loss,
        torch.where(valid, p_target, zero),
        torch.where(valid, h, zero),
        w,
    )


def make_case(
    seed: int,
    n_tokens: int,
    vocab: int,
    *,
    ignore_frac: float = 0.25,
    confident_rows: int = 4,
    scale: float = 3.0,
    ignore_index: int = -100,
):
    """Random logits [n, vocab] with some ignored tokens and some "confident conflict" rows
    (one logit far above the rest, label elsewhere); same result for the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_tokens, vocab, generator=gen, dtype=torch.float64) * scale
    target = torch.randint(0, vocab, (n_tokens,), generator=gen)
    for row in range(min(confident_rows, n_tokens)):
        peak = (int(target[row]) + 1 + row) % vocab
        logits[row, peak] += 25.0  # p(peak) ~ 1, label far from it
    ignored = torch.rand(n_tokens, generator=gen) < ignore_frac
    ignored[confident_rows : confident_rows + 1] = True
    target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    return logits, target
