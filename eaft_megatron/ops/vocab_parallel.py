"""Vocab-parallel entropy-adaptive cross-entropy (SFT / DFT / EAFT) for Megatron-Core.

Drop-in for ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``: the logits stay
split over the vocabulary (each tensor-parallel rank holds ``[..., V/tp]``) and are never
gathered.

How it works (per TP rank, N tokens, V_l = V/tp local vocabulary, k_l = min(top_k, V_l)):

Forward, one pass over the logits, in row chunks that fit the cache:
    the local max ``m_r`` and top-k values (``entropy="topk"``) read from the input chunk,
    ``work = exp(z - m_r)`` written to the fp32 working buffer [N, V_l] (the caller's logits are
    never written), its row sum ``S_r`` and, for ``entropy="full"``,
    ``T_r = sum exp(z - m_r) * (z - m_r)`` (through a chunk-sized scratch buffer).
    Collectives: ONE ``all_gather`` of the per-token partials [N, 3 (+1 full) (+k_l topk)]
    floats (not logits). Every rank then merges them identically:
    ``M = max_r m_r``, ``S = sum_r exp(m_r - M) S_r``, ``lse = M + log S``,
    ``CE = lse - z_y``, ``p_y = exp(-CE)``, the global top-k is the top-k of the gathered
    ``[N, k_l * tp]`` local top-k values, full entropy
    ``H = log S - sum_r exp(m_r - M) (T_r + (m_r - M) S_r) / S``.
    (Equivalent to a MAX all-reduce followed by one SUM all-reduce of the rescaled partials, and
    the top-k all-gather, in a single collective; with tp=1 no collective runs at all.)
Backward, no collective:
    ``dL/dz = g * w * (softmax(z) - onehot(y))`` formed in place in ``work``
    (``softmax = work * exp(m_r - M) / S``) and returned in the input dtype.

Memory: ``work`` (fp32, size of the logits shard) is the only [N, V_l] tensor kept from forward
to backward, and the only one created in backward: with an fp32 input it is returned as the
gradient itself, with bf16/fp16 input the gradient is written chunk by chunk over the front half
of its storage. Peak extra memory is therefore 4 bytes per logit (Megatron's own CE: 6 for bf16
input, as its fp32 gradient is cast to bf16 by autograd; 0 for fp32 input, which it overwrites).

That is the PyTorch path (``impl="torch"``, the CPU implementation). On CUDA, ``impl="auto"``
computes the same per-token partials with the Triton kernels of :mod:`.triton_eaft` (one read of
the logits forward, the gradient written in the input dtype backward, no fp32 buffer) and shares
the all-gather, the merge and the gate below.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .gates import token_weight, validate_gate_options

# Rows per chunk are chosen so that one chunk of the fp32 working buffer is about this size.
# CPU: large enough that per-op overhead is negligible, small enough to stay in cache between
# the max, top-k, shift, exp and sum that each chunk goes through (measured in benchmarks/).
# GPU: kernels stream from HBM anyway and launches cost, so chunks are as large as practical.
_CHUNK_BYTES_CPU = 4 << 20
_CHUNK_BYTES_GPU = 1 << 30


def default_chunk_rows(vocab_local: int, device: torch.device) -> int:
    budget = _CHUNK_BYTES_CPU if device.type == "cpu" else _CHUNK_BYTES_GPU
    return max(1, budget // (4 * vocab_local))


class EAFTTokenStats(NamedTuple):
    """Per-token statistics from the same forward pass (detached, float32, shape of ``target``).

    Entries of ignored tokens are 0. ``entropy`` is in nats, over the top-k renormalised
    softmax (``entropy="topk"``) or the full vocabulary (``entropy="full"``).
    """

    cross_entropy: torch.Tensor  # CE_t = -log p_t(y_t), unweighted (plain SFT loss)
    target_prob: torch.Tensor  # p_t(y_t) under the full softmax
    entropy: torch.Tensor  # H_t used by the gate
    weight: torch.Tensor  # w_t applied to CE_t (1 for sft)
    mask: torch.Tensor  # bool, True where the token is supervised (target != ignore_index)
    top_token: torch.Tensor | None = None  # int64 argmax_v z_t,v: the model's most likely
    # token over the whole vocabulary (first one on ties, as torch.argmax), -1 where ignored;
    # from the same all-gather (one more partial column); None from callers that built the
    # statistics without it


def _resolve_tp_group(tp_group):
    """The explicit group, else Megatron-Core's TP group when initialised, else None (tp=1)."""
    if tp_group is not None:
        return tp_group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from megatron.core import parallel_state
    except ImportError:  # megatron-core is a dependency, but keep the op usable without it
        return None
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _group_rank_size(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# torch >= 2.14 renamed all_gather_into_tensor (still present, with a FutureWarning).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather_partials(partials: torch.Tensor, group, world: int) -> torch.Tensor:
    """[N, C] per rank -> [world, N, C] on every rank (one collective)."""
    if world == 1:
        return partials.unsqueeze(0)
    out = partials.new_empty((world * partials.shape[0],) + tuple(partials.shape[1:]))
    _all_gather_single(out, partials.contiguous(), group=group)
    return out.view((world,) + tuple(partials.shape))


def _entropy_of_sorted_logits(top: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax over each row of ``top`` [N, k], sorted descending.

    Written as ``log1p(s) - sum_i e_i d_i / (1 + s)`` with ``d_i = x_i - x_0 <= 0``,
    ``e_i = exp(d_i)`` and ``s = sum_{i>0} e_i``, so that a very peaked row (``s`` below fp32
    epsilon) keeps full relative precision instead of rounding ``1 + s`` to 1.
    """
    d = top[:, 1:] - top[:, :1]
    e = torch.exp(d)
    s = e.sum(dim=1)
    # e * d -> 0 as d -> -inf (a -inf logit has probability 0 and adds no entropy)
    ed = torch.where(e > 0, e * d, torch.zeros_like(e))
    return torch.log1p(s) - ed.sum(dim=1) / (1.0 + s)


def label_layout(target: torch.Tensor, *, rank: int, vocab_local: int, ignore_index: int):
    """(valid, owned, local_index) for flat global label ids on this rank's vocabulary shard:
    supervised tokens, those whose label this rank holds, and its column here (0 elsewhere)."""
    valid = target != ignore_index
    local_target = target - rank * vocab_local
    owned = valid & (local_target >= 0) & (local_target < vocab_local)
    return valid, owned, torch.where(owned, local_target, 0)


class MergedPartials(NamedTuple):
    cross_entropy: torch.Tensor  # [N] CE_t over the whole vocabulary
    target_prob: torch.Tensor  # [N] p_t(y_t)
    entropy: torch.Tensor | None  # [N] H_t for the gate (None if not asked for)
    softmax_scale: torch.Tensor  # [N] exp(m_r - M) / S: softmax = exp(z - m_r) * scale here
    log_sum_exp: torch.Tensor  # [N] log sum_v exp(z_v) over the whole vocabulary
    top_token: torch.Tensor | None = None  # [N] int64 global argmax (when asked for)


# Global token ids travel as float32 in the partials: exact below 2**24.
MAX_TOP_TOKEN_VOCAB = 1 << 24


def partial_columns(*, full: bool, k_local: int, top: bool = False) -> int:
    """Columns of the per-token partials: 0 local max m_r, 1 s_r = sum exp(z - m_r) - 1,
    2 label logit (0 where this rank does not own the label), [3 sum exp(z - m_r) (z - m_r) for
    full entropy], then the k_local largest logits, [then the local argmax as a global id]."""
    return (4 if full else 3) + k_local + int(top)


def local_partials(chunk: torch.Tensor, buf: torch.Tensor, part: torch.Tensor, *, k_local: int,
                   full: bool, scratch: torch.Tensor | None, top_offset: int | None = None
                   ) -> None:
    """One row chunk: fill ``part`` (all columns but the label's) and ``buf = exp(z - m_r)``.

    ``chunk`` [n, V_l] is read in its own dtype (max and top-k are exact on it); ``buf`` [n, V_l]
    fp32 receives the exponentials; ``scratch`` (fp32, at least [n, V_l]) is needed for
    ``full``. ``top_offset``: this rank's first global id; when given, the last column receives
    the local argmax (first maximum) as a global id (same pass as the max).
    """
    col_topk = 4 if full else 3
    if k_local:
        part[:, col_topk:col_topk + k_local] = chunk.topk(k_local, dim=1, sorted=False).values
    if top_offset is None:
        row_max = chunk.amax(dim=1, keepdim=True).to(torch.float32)
    else:
        values, index = chunk.max(dim=1, keepdim=True)
        row_max = values.to(torch.float32)
        part[:, -1] = (index.squeeze(1) + top_offset).to(torch.float32)
    part[:, 0] = row_max.squeeze(1)
    # A row whose logits here are all -inf (a masked shard) keeps m_r = -inf in the partials
    # (weight exp(m_r - M) = 0 in the merge) but is shifted by 0, so exp gives 0 instead of NaN.
    shift = row_max.masked_fill(row_max == float("-inf"), 0.0)
    if full:
        shifted = scratch[: chunk.shape[0]]
        torch.sub(chunk, shift, out=shifted)  # z - m_r, fp32
        torch.exp(shifted, out=buf)
        # s_r = S_r - 1 accumulated in fp64: log(1 + s) and the full entropy keep their
        # relative precision on confident tokens (s below fp32 epsilon).
        part[:, 1] = buf.sum(dim=1, dtype=torch.float64) - 1.0
        # p log p -> 0 as p -> 0: a -inf logit gives (-inf) * 0 = NaN here, which nansum
        # counts as its 0 (at the cost of sum). A NaN logit still makes the loss NaN: it is the
        # row's max, so CE is NaN.
        part[:, 3] = torch.mul(shifted, buf, out=shifted).nansum(dim=1)
    else:
        torch.sub(chunk, shift, out=buf)
        buf.exp_()
        part[:, 1] = buf.sum(dim=1) - 1.0


def merge_partials(gathered: torch.Tensor, *, rank: int, full: bool, k_local: int,
                   top_k: int, top: bool = False) -> MergedPartials:
    """Every rank's partials [world, N, C] -> per-token CE, p(label), entropy (identical on all
    ranks), this rank's softmax scale and, with ``top``, the global argmax: the local argmax of
    the rank holding the global max (the lowest such rank on ties: the lowest id, as
    ``torch.argmax`` over the whole vocabulary)."""
    n_tokens = gathered.shape[1]
    local_max = gathered[..., 0]
    global_max, max_rank = local_max.max(dim=0)
    rescale = torch.exp(local_max - global_max)  # exp(m_r - M), [world, N]
    # S = sum_v exp(z_v - M) = sum_r exp(m_r - M) (1 + s_r) = 1 + s, with the leading 1
    # (the global max) kept out of the sum so that log S = log1p(s) stays precise.
    others = rescale.scatter(0, max_rank.unsqueeze(0), 0.0)
    s = (rescale * gathered[..., 1]).sum(dim=0) + others.sum(dim=0)
    sum_exp = 1.0 + s
    log_sum_exp_shifted = torch.log1p(s)
    cross_entropy = global_max + log_sum_exp_shifted - gathered[..., 2].sum(dim=0)
    entropy = None
    if full:
        # H = log S - sum_v p_v (z_v - M), per rank: exp(m_r - M) (T_r + (m_r - M) S_r) / S;
        # a rank whose logits are all -inf (m_r = -inf, S_r = 0) adds 0, not (-inf) * 0
        shifted = gathered[..., 3] + (local_max - global_max) * (1.0 + gathered[..., 1])
        shifted = torch.where(rescale == 0, 0.0, rescale * shifted)
        entropy = log_sum_exp_shifted - shifted.sum(dim=0) / sum_exp
    elif k_local:
        world = gathered.shape[0]
        candidates = gathered[..., 3:3 + k_local].permute(1, 0, 2).reshape(n_tokens,
                                                                            world * k_local)
        k = min(top_k, candidates.shape[1])
        entropy = _entropy_of_sorted_logits(candidates.topk(k, dim=1, sorted=True).values)
    top_token = None
    if top:
        top_token = gathered[..., -1].gather(0, max_rank.unsqueeze(0)).squeeze(0).to(torch.int64)
    return MergedPartials(cross_entropy, torch.exp(-cross_entropy), entropy,
                          rescale[rank] / sum_exp, global_max + log_sum_exp_shifted, top_token)


def weighted_loss(merged: MergedPartials, valid: torch.Tensor, *, loss_type: str, top_k: int,
                  alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_t, w_t * CE_t), both exactly 0 where not ``valid``."""
    weight = token_weight(loss_type=loss_type, target_prob=merged.target_prob,
                          entropy=merged.entropy, top_k=top_k, alpha=alpha)
    zero = torch.zeros((), dtype=torch.float32, device=weight.device)
    weight = torch.where(valid, weight, zero)
    return weight, torch.where(valid, weight * merged.cross_entropy, zero)


def token_outputs(ctx, merged: MergedPartials, weight: torch.Tensor, loss: torch.Tensor,
                  valid: torch.Tensor, shape: torch.Size) -> tuple:
    """The autograd Functions' outputs, shaped like ``target``: (loss, CE, p(label), entropy,
    weight, mask, top_token), statistics 0 (top_token -1) where ignored and marked
    non-differentiable on ``ctx``."""
    zero = torch.zeros((), dtype=torch.float32, device=loss.device)
    stats_ce = torch.where(valid, merged.cross_entropy, zero)
    stats_prob = torch.where(valid, merged.target_prob, zero)
    if merged.entropy is not None:
        stats_entropy = torch.where(valid, merged.entropy, zero)
    else:
        stats_entropy = torch.zeros_like(stats_prob)
    if merged.top_token is not None:
        top_token = torch.where(valid, merged.top_token, -1)
    else:
        top_token = torch.full(valid.shape, -1, dtype=torch.int64, device=valid.device)
    ctx.mark_non_differentiable(stats_ce, stats_prob, stats_entropy, weight, valid, top_token)
    return tuple(t.view(shape) for t in (loss, stats_ce, stats_prob, stats_entropy, weight,
                                         valid, top_token))


class _VocabParallelEAFT(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        loss_type: str,
        top_k: int,
        alpha: float,
        entropy_mode: str,
        ignore_index: int,
        group,
        need_entropy: bool,
        chunk_rows: int,
        want_top: bool = False,
    ):
        rank, world = _group_rank_size(group)
        vocab_local = logits.shape[-1]
        logits_2d = logits.reshape(-1, vocab_local)  # a view for contiguous input
        target_1d = target.reshape(-1)
        n_tokens = logits_2d.shape[0]
        device = logits.device

        valid, owned, local_index = label_layout(target_1d, rank=rank, vocab_local=vocab_local,
                                                 ignore_index=ignore_index)

        want_topk = need_entropy and entropy_mode == "topk"
        want_full = need_entropy and entropy_mode == "full"
        k_local = min(top_k, vocab_local) if want_topk else 0
        partials = torch.zeros(n_tokens, partial_columns(full=want_full, k_local=k_local,
                                                         top=want_top),
                               dtype=torch.float32, device=device)
        top_offset = rank * vocab_local if want_top else None

        work = torch.empty(n_tokens, vocab_local, dtype=torch.float32, device=device)
        scratch = (
            torch.empty(min(chunk_rows, n_tokens), vocab_local, dtype=torch.float32, device=device)
            if want_full
            else None
        )
        # The label's logit (exact in fp32 whatever the input dtype), 0 where not owned.
        partials[:, 2] = logits_2d.gather(1, local_index[:, None]).squeeze(1)
        partials[:, 2].masked_fill_(~owned, 0.0)
        for r0 in range(0, n_tokens, chunk_rows):
            r1 = min(r0 + chunk_rows, n_tokens)
            local_partials(logits_2d[r0:r1], work[r0:r1], partials[r0:r1], k_local=k_local,
                           full=want_full, scratch=scratch, top_offset=top_offset)
        del scratch

        gathered = _all_gather_partials(partials, group, world)  # [world, N, C]
        merged = merge_partials(gathered, rank=rank, full=want_full, k_local=k_local,
                                top_k=top_k, top=want_top)
        weight, loss = weighted_loss(merged, valid, loss_type=loss_type, top_k=top_k,
                                     alpha=alpha)

        ctx.save_for_backward(work, merged.softmax_scale, weight, local_index, owned)
        ctx.input_dtype = logits.dtype
        ctx.input_shape = logits.shape
        ctx.chunk_rows = chunk_rows
        return token_outputs(ctx, merged, weight, loss, valid, target.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *unused_stat_grads):
        work, softmax_scale, weight, local_index, owned = ctx.saved_tensors
        n_tokens = work.shape[0]
        # w_t is a constant of the backward pass (detached): dL/dz = g * w * (softmax - onehot).
        row_grad = grad_loss.reshape(-1).to(torch.float32) * weight  # 0 for ignored tokens
        row_scale = row_grad * softmax_scale
        owned_rows = owned.nonzero().squeeze(1)  # sorted
        owned_cols = local_index[owned_rows]
        owned_grad = row_grad[owned_rows]

        dtype = ctx.input_dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        if dtype == torch.float32:
            grad_2d = work  # the working buffer becomes the gradient
        elif itemsize < 4:
            # bf16/fp16: write the gradient over the front of the fp32 buffer's own storage, so
            # that no second [N, V_l] tensor exists during backward. Chunk i of the gradient
            # only covers fp32 rows already consumed, except where it overlaps its own source
            # chunk (the first ones): those go through a chunk-sized temporary.
            grad_2d = work.view(-1).view(dtype)[: work.numel()].view(work.shape)
        else:
            grad_2d = torch.empty(work.shape, dtype=dtype, device=work.device)
        step = ctx.chunk_rows
        bounds = torch.searchsorted(
            owned_rows, torch.arange(0, n_tokens + step, step, device=work.device)
        ).tolist()
        for i, r0 in enumerate(range(0, n_tokens, step)):
            r1 = min(r0 + step, n_tokens)
            buf = work[r0:r1]
            lo, hi = bounds[i], bounds[i + 1]
            rows, cols = owned_rows[lo:hi] - r0, owned_cols[lo:hi]
            if grad_2d is work:
                buf.mul_(row_scale[r0:r1, None])
                buf[rows, cols] -= owned_grad[lo:hi]
                continue
            # scale and cast in one pass; the label entries are redone in fp32
            label = buf[rows, cols] * row_scale[owned_rows[lo:hi]] - owned_grad[lo:hi]
            overlaps = itemsize < 4 and r1 * itemsize > r0 * 4
            out = torch.empty_like(grad_2d[r0:r1]) if overlaps else grad_2d[r0:r1]
            torch.mul(buf, row_scale[r0:r1, None], out=out)
            out[rows, cols] = label.to(dtype)
            if overlaps:
                grad_2d[r0:r1].copy_(out)
        return (grad_2d.view(ctx.input_shape),) + (None,) * 10


def _validate_inputs(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, world: int):
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(
            f"vocab_parallel_logits and target must be tensors, got "
            f"{type(logits).__name__} and {type(target).__name__}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"vocab_parallel_logits must be floating point, got dtype {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"vocab_parallel_logits must have a non-empty last (vocabulary) dimension, "
            f"got shape {tuple(logits.shape)}"
        )
    validate_target(target, expected_shape=tuple(logits.shape[:-1]),
                    vocab_local=logits.shape[-1], world=world, ignore_index=ignore_index,
                    device=logits.device, what=f"the logits' leading shape (logits shape "
                                               f"{tuple(logits.shape)})")


def validate_target(target: torch.Tensor, *, expected_shape: tuple, vocab_local: int, world: int,
                    ignore_index: int, device: torch.device, what: str) -> None:
    """Type, shape, device and range of the label ids (one host sync for the range)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of token ids, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(expected_shape):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal {what} {tuple(expected_shape)}"
        )
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the inputs are on {device}")
    vocab = vocab_local * world
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):  # one host sync per call: the price of a clear error
        first = target[bad].reshape(-1)[0].item()
        raise ValueError(
            f"target contains token id {first} outside [0, {vocab}) (vocabulary "
            f"{vocab_local} per rank x tp {world}) that is not ignore_index={ignore_index}"
        )


@torch.compiler.disable
def vocab_parallel_eaft_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    loss_type: str = "eaft",
    top_k: int = 20,
    alpha: float = 1.0,
    entropy: str = "topk",
    ignore_index: int = -100,
    tp_group: "dist.ProcessGroup | None" = None,
    return_stats: bool = False,
    chunk_rows: int | None = None,
    impl: str = "auto",
    inplace_backward: bool = False,
) -> "torch.Tensor | tuple[torch.Tensor, EAFTTokenStats]":
    """Per-token entropy-adaptive cross-entropy over vocab-parallel logits.

    Args:
        vocab_parallel_logits: ``[..., V/tp]`` (Megatron: ``[s, b, V/tp]``) fp32/bf16/fp16,
            this rank's contiguous shard of the vocabulary (rank r owns ids
            ``[r * V/tp, (r+1) * V/tp)``, Megatron's layout). Read only: never modified.
        target: ``[...]`` integer global token ids; ``ignore_index`` marks unsupervised tokens.
        loss_type: ``"sft"`` (w=1), ``"dft"`` (w=p_target**alpha) or ``"eaft"``.
        top_k, alpha: the EAFT gate ``w = (H_topK / ln top_k) ** alpha``, detached.
        entropy: ``"topk"`` (the paper: entropy of the softmax renormalised over the top_k
            largest logits) or ``"full"`` (entropy over the whole vocabulary,
            ``w = min(H / ln top_k, 1) ** alpha``).
        ignore_index: target value of unsupervised tokens.
        tp_group: the tensor-parallel group; None means Megatron-Core's TP group when
            ``parallel_state`` is initialised, otherwise no tensor parallelism.
        return_stats: also return :class:`EAFTTokenStats` (target probability, entropy, gate
            weight, mask, unweighted CE) from the same pass, for logging.
        chunk_rows: rows per chunk of the forward and backward passes of the PyTorch path
            (default: about 4 MiB of fp32 on CPU, 1 GiB on GPU).
        impl: ``"auto"`` (Triton kernels on CUDA, the PyTorch path on CPU; on CUDA a missing or
            too old Triton, an fp64 or non-contiguous input, ``top_k`` > 128 or kernels that
            fail to compile or launch fall back to the PyTorch path with a log line),
            ``"triton"`` (:mod:`.triton_eaft`; on CPU only under ``TRITON_INTERPRET=1``;
            anything it cannot run is a one-line error) or ``"torch"``. Both give the same
            results.
        inplace_backward: allow the Triton path to write the gradient over
            ``vocab_parallel_logits`` (their contents are then the gradient after backward):
            the loss then adds no ``[N, V/tp]`` memory at all. Only for logits nobody reads
            after the loss (the fused output layer's); ignored by the PyTorch path.

    Returns:
        The per-token loss ``w_t * CE_t``: float32, shape of ``target``, exactly 0 where
        ignored. Reduce it as Megatron does: ``loss.sum() / num_supervised_tokens``.
        With ``return_stats=True``: ``(loss, EAFTTokenStats)``.

    Collectives (only when the group has more than one rank): forward, one all-gather of
    ``[N, 3 + k_l]`` (topk) or ``[N, 4]`` (full) float32 per-token partials (``[N, 3]`` for
    sft/dft without stats); backward, none. Non-finite logits (NaN, +inf) make that token's
    loss non-finite rather than being hidden; a ``-inf`` logit (a masked vocabulary entry) has
    probability 0 and adds nothing to the entropy, in every mode. No tokens (``N = 0``) give an
    empty loss and an empty gradient. Bad input raises ``ValueError``/``TypeError``.

    Under ``torch.compile`` this function is a graph break (``torch.compiler.disable``): it runs
    eagerly inside a compiled model, so the compiler never copies the working buffer.
    """
    validate_gate_options(loss_type=loss_type, top_k=top_k, alpha=alpha, entropy=entropy)
    group = _resolve_tp_group(tp_group)
    rank, world = _group_rank_size(group)
    _validate_inputs(vocab_parallel_logits, target, ignore_index, world)
    validate_gate_options(loss_type=loss_type, top_k=top_k, alpha=alpha, entropy=entropy,
                          vocab=vocab_parallel_logits.shape[-1] * world)
    vocab_local = vocab_parallel_logits.shape[-1]
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(vocab_local, vocab_parallel_logits.device)
    elif chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    need_entropy = loss_type == "eaft" or return_stats
    if return_stats and vocab_local * world > MAX_TOP_TOKEN_VOCAB:
        raise ValueError(f"return_stats supports vocabularies up to {MAX_TOP_TOKEN_VOCAB} ids "
                         f"(top_token travels as float32), got {vocab_local * world}")
    from .triton_eaft import TritonVocabParallelEAFT, resolve_impl, with_fallback

    k_local = min(top_k, vocab_local) if need_entropy and entropy == "topk" else 0
    args = (vocab_parallel_logits, target.long(), loss_type, top_k, float(alpha), entropy,
            ignore_index, group, need_entropy)
    run_torch = lambda: _VocabParallelEAFT.apply(*args, chunk_rows, return_stats)  # noqa: E731
    if resolve_impl(impl, vocab_parallel_logits, k_local=k_local) == "triton":
        outputs = with_fallback(
            impl, vocab_parallel_logits.device,
            lambda: TritonVocabParallelEAFT.apply(*args, return_stats, bool(inplace_backward)),
            run_torch)
    else:
        outputs = run_torch()
    loss, ce, prob, ent, weight, mask, top = outputs
    if return_stats:
        stats = EAFTTokenStats(cross_entropy=ce, target_prob=prob, entropy=ent, weight=weight,
                               mask=mask, top_token=top)
        return loss, stats
    return loss
