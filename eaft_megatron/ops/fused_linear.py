"""Output layer + EAFT loss in one op that never materialises the logits.

    loss = fused_linear_eaft_cross_entropy(hidden, weight, target, loss_type="eaft")

equals ``vocab_parallel_eaft_cross_entropy(hidden @ weight.T, target, ...)`` with Megatron's
``ColumnParallelLinear`` output layer in front (its TP / sequence-parallel communication
included), but processes the tokens in chunks so that no [N, V/tp] tensor exists at once.

Forward, per chunk of tokens (per TP rank; N tokens, V_l = V/tp, h hidden):
    logits_c = hidden_c @ weight.T                           [n, V_l], dropped after the chunk
    per-token partials (max, sum-exp, label logit, local top-k / sum p*z)  -> one all_gather
    merged exactly as in :mod:`.vocab_parallel` (same collective, batched per chunk)
    the gradients for an upstream gradient of 1 per token:
        dz_c = w (softmax - onehot);  grad_hidden_c = dz_c @ weight;  grad_weight += dz_c.T @ hidden_c
Backward: Megatron reduces the per-token loss as ``sum(loss * mask) * c`` (mask = supervised
tokens, which are exactly the tokens with a non-zero weight here), so the upstream gradient is
one constant ``c`` on the supervised tokens: the saved gradients are scaled by it (no GEMM). Any
other upstream gradient is handled exactly by recomputing the logits chunk by chunk (two more
GEMMs). Then the tensor-parallel reduction of ``grad_hidden`` that the bypassed output layer
would have done: all-reduce, or reduce-scatter over the sequence with ``sequence_parallel``.

Memory: chunk-sized logits buffers, the fp32 gradient of the hidden states ([N, h]) and of the
weight ([V_l, h]) -- the latter is what the output layer's backward produces anyway. On CUDA
(``impl="auto"``) the per-chunk partials and ``dz`` come from the Triton kernels of
:mod:`.triton_eaft`: ``dz`` is written over the chunk's logits (input dtype), so the chunk's
logits are the only [n, V_l] buffer, and chunks are sized by that buffer's memory budget.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .gates import validate_gate_options
from .triton_eaft import eaft_grad, eaft_partials, resolve_impl, with_fallback
from .vocab_parallel import (
    MAX_TOP_TOKEN_VOCAB,
    EAFTTokenStats,
    _all_gather_partials,
    _group_rank_size,
    _resolve_tp_group,
    label_layout,
    local_partials,
    merge_partials,
    partial_columns,
    validate_target,
    weighted_loss,
)

# Tokens per chunk: at least 256 (below that the GEMMs lose efficiency: measured 1.33x the
# unfused time with 65-token chunks, 1.06x with 256, on CPU), and more while the chunk's fp32
# logits stay under the budget.
# With the Triton kernels the chunk's logits (input dtype) are the only [n, V_l] buffer and become
# the gradient in place: the budget bounds the loss part's memory (256 MiB: 883 tokens of bf16
# logits at V_l = 151936, ~1/10 of the unfused loss-part memory at N = 8192; speed not measured).
_MIN_CHUNK_TOKENS = 256
_CHUNK_LOGITS_BYTES_CPU = 16 << 20
_CHUNK_LOGITS_BYTES_GPU = 1 << 30
_CHUNK_LOGITS_BYTES_TRITON = 256 << 20


def default_chunk_tokens(vocab_local: int, device: torch.device, *, triton: bool = False,
                         itemsize: int = 4) -> int:
    if triton:
        return max(_MIN_CHUNK_TOKENS, _CHUNK_LOGITS_BYTES_TRITON // (itemsize * vocab_local))
    budget = _CHUNK_LOGITS_BYTES_CPU if device.type == "cpu" else _CHUNK_LOGITS_BYTES_GPU
    return max(_MIN_CHUNK_TOKENS, budget // (4 * vocab_local))


def _gather_sequence(hidden: torch.Tensor, group, world: int) -> torch.Tensor:
    """[s/tp, b, h] -> [s, b, h] (sequence-parallel input of the output layer)."""
    out = hidden.new_empty((world * hidden.shape[0],) + tuple(hidden.shape[1:]))
    dist.all_gather_into_tensor(out, hidden.contiguous(), group=group)
    return out


class _FusedLinearEAFT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, loss_type, top_k, alpha, entropy_mode,
                ignore_index, group, sequence_parallel, chunk_tokens, need_entropy, vocab_size,
                want_top=False, use_triton=False):
        rank, world = _group_rank_size(group)
        sp = sequence_parallel and world > 1
        full_hidden = _gather_sequence(hidden, group, world) if sp else hidden
        h2 = full_hidden.reshape(-1, full_hidden.shape[-1])  # [N, h]
        t1 = target.reshape(-1)
        n_tokens, vocab_local = h2.shape[0], weight.shape[0]
        device = hidden.device

        valid, owned, local_index = label_layout(t1, rank=rank, vocab_local=vocab_local,
                                                 ignore_index=ignore_index)
        want_full = need_entropy and entropy_mode == "full"
        k_local = min(top_k, vocab_local) if need_entropy and entropy_mode == "topk" else 0
        columns = partial_columns(full=want_full, k_local=k_local, top=want_top)
        top_offset = rank * vocab_local if want_top else None
        # Padded vocabulary rows (ids >= vocab_size) on this rank: excluded from the softmax.
        first_padded = vocab_local if vocab_size is None else max(vocab_size - rank * vocab_local, 0)

        f32 = dict(dtype=torch.float32, device=device)
        out = {k: torch.zeros(n_tokens, **f32) for k in ("loss", "ce", "prob", "ent", "w", "lse")}
        top_token = torch.full((n_tokens,), -1, dtype=torch.int64, device=device)
        grad_hidden = torch.empty(n_tokens, h2.shape[1], **f32)
        grad_weight = torch.zeros(weight.shape, **f32)
        chunk = max(1, min(chunk_tokens, n_tokens))  # no tokens: no chunk, zero gradients
        # the PyTorch path's fp32 working buffers (the Triton kernels need none)
        buf = None if use_triton else torch.empty(chunk, vocab_local, **f32)
        scratch = torch.empty(chunk, vocab_local, **f32) if want_full and not use_triton \
            else None
        for c0 in range(0, n_tokens, chunk):
            c1 = min(c0 + chunk, n_tokens)
            hc = h2[c0:c1]
            logits = hc @ weight.t()  # [n, V_l] in the input dtype, as the output layer
            if first_padded < vocab_local:
                logits[:, first_padded:] = torch.finfo(logits.dtype).min / 2
            part = torch.zeros(c1 - c0, columns, **f32)
            if use_triton:
                label_local = torch.where(owned[c0:c1], local_index[c0:c1], -1)
                eaft_partials(logits, label_local, part, k_local=k_local, full=want_full,
                              top_offset=top_offset)
            else:
                part[:, 2] = logits.gather(1, local_index[c0:c1, None]).squeeze(1)
                part[:, 2].masked_fill_(~owned[c0:c1], 0.0)
                b = buf[: c1 - c0]
                local_partials(logits, b, part, k_local=k_local, full=want_full,
                               scratch=scratch, top_offset=top_offset)
                del logits
            merged = merge_partials(_all_gather_partials(part, group, world), rank=rank,
                                    full=want_full, k_local=k_local, top_k=top_k, top=want_top)
            w, loss = weighted_loss(merged, valid[c0:c1], loss_type=loss_type, top_k=top_k,
                                    alpha=alpha)
            out["loss"][c0:c1] = loss
            out["w"][c0:c1] = w
            out["ce"][c0:c1] = merged.cross_entropy
            out["prob"][c0:c1] = merged.target_prob
            out["lse"][c0:c1] = merged.log_sum_exp
            if merged.entropy is not None:
                out["ent"][c0:c1] = merged.entropy
            if merged.top_token is not None:
                top_token[c0:c1] = torch.where(valid[c0:c1], merged.top_token, -1)
            # dz for an upstream gradient of 1: w * (softmax - onehot), formed in place in b
            # (Triton: in the input dtype, over the chunk's logits)
            if use_triton:
                eaft_grad(logits, logits, label_local, w, part[:, 0].contiguous(),
                          merged.softmax_scale)
                b = logits
            else:
                b.mul_((w * merged.softmax_scale)[:, None])
                rows = owned[c0:c1].nonzero().squeeze(1)
                b[rows, local_index[c0:c1][rows]] -= w[rows]
            _accumulate_grads(b, hc, weight, grad_hidden[c0:c1], grad_weight)
            del b
        ctx.save_for_backward(hidden, weight, grad_hidden, grad_weight, out["w"], out["lse"],
                              local_index, owned)
        ctx.group, ctx.world, ctx.sp, ctx.chunk = group, world, sp, chunk
        ctx.first_padded = first_padded
        zero = torch.zeros((), **f32)
        stats = [torch.where(valid, out[k], zero).view(target.shape)
                 for k in ("ce", "prob", "ent")]
        ctx.mark_non_differentiable(*stats, out["w"], valid, top_token)
        return (out["loss"].view(target.shape), *stats, out["w"].view(target.shape),
                valid.view(target.shape), top_token.view(target.shape))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *unused):
        hidden, weight, grad_hidden, grad_weight, w, lse, local_index, owned = ctx.saved_tensors
        g = grad_loss.reshape(-1).to(torch.float32)
        active = w != 0
        g_active = g[active]
        if g_active.numel() == 0:
            grad_hidden.zero_()
            grad_weight.zero_()
        elif bool((g_active == g_active[0]).all()):  # Megatron: a constant on supervised tokens
            scale = g_active[0]
            grad_hidden.mul_(scale)
            grad_weight.mul_(scale)
        else:  # any other upstream gradient: recompute the logits chunk by chunk
            _recompute_grads(ctx, hidden, weight, grad_hidden, grad_weight, w * g, lse,
                             local_index, owned)
        grad_hidden = grad_hidden.to(hidden.dtype)
        if ctx.world > 1:  # what the bypassed ColumnParallelLinear's input mapping does
            if ctx.sp:
                out = hidden.new_empty(hidden.shape)
                dist.reduce_scatter_tensor(out, grad_hidden.view((-1,) + tuple(hidden.shape[1:])),
                                           group=ctx.group)
                grad_hidden = out
            else:
                dist.all_reduce(grad_hidden, group=ctx.group)
        return (grad_hidden.view(hidden.shape), grad_weight.to(weight.dtype)) + (None,) * 13


def _accumulate_grads(dz: torch.Tensor, hc: torch.Tensor, weight: torch.Tensor,
                      grad_hidden: torch.Tensor, grad_weight: torch.Tensor) -> None:
    """grad_hidden (chunk rows) = dz @ weight; grad_weight += dz.T @ hidden_chunk.

    ``dz`` is [n, V_l], fp32 (or the weight's dtype, from the Triton kernel). fp32 weights: both
    GEMMs in fp32, the weight gradient accumulated in place (no weight-sized temporary). Lower
    precision: GEMMs in the weight's dtype, as the output layer's own backward, accumulated into
    the fp32 buffer.
    """
    if weight.dtype == torch.float32:
        torch.mm(dz, weight, out=grad_hidden)
        grad_weight.addmm_(dz.t(), hc)
    else:
        dz = dz.to(weight.dtype)
        grad_hidden.copy_(dz @ weight)
        grad_weight += dz.t() @ hc


def _recompute_grads(ctx, hidden, weight, grad_hidden, grad_weight, row_grad, lse, local_index,
                     owned):
    h2 = (_gather_sequence(hidden, ctx.group, ctx.world) if ctx.sp else hidden)
    h2 = h2.reshape(-1, h2.shape[-1])
    grad_weight.zero_()
    for c0 in range(0, h2.shape[0], ctx.chunk):
        c1 = min(c0 + ctx.chunk, h2.shape[0])
        hc = h2[c0:c1]
        logits = hc @ weight.t()
        if ctx.first_padded < logits.shape[1]:
            logits[:, ctx.first_padded:] = torch.finfo(logits.dtype).min / 2
        dz = logits.to(torch.float32).sub_(lse[c0:c1, None]).exp_()
        dz.mul_(row_grad[c0:c1, None])
        rows = owned[c0:c1].nonzero().squeeze(1)
        dz[rows, local_index[c0:c1][rows]] -= row_grad[c0:c1][rows]
        _accumulate_grads(dz, hc, weight, grad_hidden[c0:c1], grad_weight)


@torch.compiler.disable
def fused_linear_eaft_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    sequence_parallel: bool = False,
    chunk_tokens: int | None = None,
    loss_type: str = "eaft",
    top_k: int = 20,
    alpha: float = 1.0,
    entropy: str = "topk",
    ignore_index: int = -100,
    tp_group: "dist.ProcessGroup | None" = None,
    return_stats: bool = False,
    vocab_size: int | None = None,
    impl: str = "auto",
):
    """Per-token EAFT loss of ``hidden @ weight.T`` without materialising the logits.

    Args:
        hidden: ``[s, b, h]`` last hidden states (``[s/tp, b, h]`` with ``sequence_parallel``).
        weight: ``[V/tp, h]`` this rank's shard of the output-layer (or tied embedding) weight.
        target: ``[s, b]`` global token ids, ``ignore_index`` for unsupervised tokens.
        sequence_parallel: the hidden states are split over the sequence across TP ranks.
        chunk_tokens: tokens per chunk (default: >= 256, more while the chunk's logits stay
            under a memory budget: with the Triton kernels 256 MiB of logits in the input dtype,
            else fp32 logits under 16 MiB on CPU / 1 GiB on GPU).
        loss_type, top_k, alpha, entropy, ignore_index, tp_group, return_stats: as in
            :func:`vocab_parallel_eaft_cross_entropy`.
        vocab_size: the real vocabulary when ``weight`` holds padded rows (Megatron pads to a
            multiple of 128 x tp): logits of ids >= vocab_size are left out of the softmax.
        impl: ``"auto"`` (the Triton kernels on CUDA, with the gradient written over each
            chunk's logits, which nothing else reads; the PyTorch path on CPU), ``"triton"``,
            ``"torch"``: as in :func:`vocab_parallel_eaft_cross_entropy`.

    Returns the per-token loss ``[s, b]`` float32 (and :class:`EAFTTokenStats` with
    ``return_stats``). Collectives: with sequence parallelism an all-gather of the hidden
    states; per chunk one all-gather of ``[n, 3 + k_l]`` partials; backward: all-reduce (or
    reduce-scatter) of the hidden-state gradient.
    """
    validate_gate_options(loss_type=loss_type, top_k=top_k, alpha=alpha, entropy=entropy)
    group = _resolve_tp_group(tp_group)
    _, world = _group_rank_size(group)
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"hidden and weight must be floating point, got {hidden.dtype} and "
                        f"{weight.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [V/tp, h={hidden.shape[-1]}], got {tuple(weight.shape)}")
    seq = hidden.shape[0] * (world if sequence_parallel else 1)
    validate_target(target, expected_shape=(seq,) + tuple(hidden.shape[1:-1]),
                    vocab_local=weight.shape[0], world=world, ignore_index=ignore_index,
                    device=hidden.device, what=f"the tokens of hidden {tuple(hidden.shape)} "
                    f"(sequence_parallel={sequence_parallel}, tp={world})")
    validate_gate_options(loss_type=loss_type, top_k=top_k, alpha=alpha, entropy=entropy,
                          vocab=vocab_size or weight.shape[0] * world)
    need_entropy = loss_type == "eaft" or return_stats
    k_local = min(top_k, weight.shape[0]) if need_entropy and entropy == "topk" else 0
    use_triton = resolve_impl(impl, k_local=k_local, device=hidden.device,
                              dtype=weight.dtype) == "triton"
    chunk_default = chunk_tokens is None
    if chunk_default:
        chunk_tokens = default_chunk_tokens(weight.shape[0], hidden.device, triton=use_triton,
                                            itemsize=weight.element_size())
    elif chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if return_stats and weight.shape[0] * world > MAX_TOP_TOKEN_VOCAB:
        raise ValueError(f"return_stats supports vocabularies up to {MAX_TOP_TOKEN_VOCAB} ids "
                         f"(top_token travels as float32), got {weight.shape[0] * world}")
    args = (hidden, weight, target.long(), loss_type, top_k, float(alpha), entropy, ignore_index,
            group, sequence_parallel)
    tail = (need_entropy, vocab_size, return_stats)
    if use_triton:
        outputs = with_fallback(
            impl, hidden.device, lambda: _FusedLinearEAFT.apply(*args, chunk_tokens, *tail, True),
            lambda: _FusedLinearEAFT.apply(*args, default_chunk_tokens(
                weight.shape[0], hidden.device) if chunk_default else chunk_tokens, *tail, False))
    else:
        outputs = _FusedLinearEAFT.apply(*args, chunk_tokens, *tail, False)
    loss, ce, prob, ent, w, mask, top = outputs
    if return_stats:
        return loss, EAFTTokenStats(cross_entropy=ce, target_prob=prob, entropy=ent, weight=w,
                                    mask=mask, top_token=top)
    return loss
