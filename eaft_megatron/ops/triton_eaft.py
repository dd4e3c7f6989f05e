"""Triton kernels of the vocab-parallel EAFT loss: one pass over the logits forward, one backward.

``vocab_parallel_eaft_cross_entropy(..., impl="triton")`` (and ``impl="auto"`` on CUDA) runs
here; the all-gather of the per-token partials, their merge and the gate are the PyTorch path's
own (:mod:`.vocab_parallel`), so both paths give the same numbers by construction of the
partials, which the kernels reproduce column for column (see ``partial_columns``).

Forward kernel, one program per token row (per TP rank, N tokens, V_l = V/tp), one read of the
row in blocks of ``BLOCK`` logits, in the input dtype, accumulated in fp32:
    running max ``m`` and, relative to it, ``s = sum exp(z - m) - 1`` (the row's maximum counted
    as the 1, so that a confident row keeps ``s`` below fp32 epsilon exactly); on a new maximum
    both rescale by ``exp(m_old - m_new)``;
    ``entropy="full"``: ``T = sum exp(z - m) (z - m)``, rescaled as
    ``T' = a (T + (m_old - m_new) S_old)`` with ``a = exp(m_old - m_new)``;
    ``entropy="topk"``: a running top-K' (K' = the power of two >= K, ``tl.topk`` needs one): a
    block with more than ``_FEW`` values above the running K'-th takes its own top-K' and merges
    it with the running one (top-K' of the 2K' candidates), one with a few inserts them one by
    one in place of the running minimum, others skip it;
    the argmax (first index on ties, as ``torch.argmax``) and the label's logit.
    Writes the ``[N, C]`` float32 partials; then ONE all-gather across TP (as the PyTorch path).
Backward kernel, one program per row, no collective: reads the logits once more and writes
    ``g w (exp(z - m_r) exp(m_r - M) / S - onehot(y))`` in the input dtype, into a new tensor or,
    with ``inplace_backward=True``, over the logits themselves (rows with ``g w = 0`` are only
    written). No fp32 ``[N, V_l]`` buffer exists at any point: the loss adds 0 bytes per logit
    in forward and the gradient (2 bytes per bf16 logit, 0 in place) in backward.

CPU: ``TRITON_INTERPRET=1`` runs the same kernels under Triton's interpreter (tests). It has no
bf16 arithmetic (bf16 is handled as raw 16-bit integers there, so comparisons are silently
wrong): CPU tests use fp32 and fp16 only; bf16 is only meaningful on a GPU.

Speed: NOT measured on a GPU yet (no GPU was available when this was written); block sizes and
warp counts are untuned first choices.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .vocab_parallel import (
    _all_gather_partials,
    _group_rank_size,
    label_layout,
    merge_partials,
    partial_columns,
    token_outputs,
    weighted_loss,
)

log = logging.getLogger(__name__)

IMPLS = ("auto", "triton", "torch")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TRITON_TOP_K = 128  # K' (power of two) of the running top-K; larger K: the PyTorch path


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, read when the kernels compile)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@functools.lru_cache(maxsize=1)
def triton_problem() -> str | None:
    """Why the Triton path cannot run here (None when it can): missing or too old."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        return f"triton is not importable ({e})"
    missing = [name for name in ("topk", "join", "argmax") if not hasattr(tl, name)]
    if missing:
        return (f"triton {getattr(triton, '__version__', '?')} is too old (no tl."
                f"{', tl.'.join(missing)}; need triton >= 3.2)")
    return None


def resolve_impl(impl: str, logits: torch.Tensor | None = None, *, k_local: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> str:
    """``"triton"`` or ``"torch"`` for these logits (or, without them, for logits of ``dtype``
    on ``device`` that the caller makes contiguous); ``ValueError``/``RuntimeError`` (one line)
    when ``impl="triton"`` cannot run; ``impl="auto"`` falls back to torch with a log line."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if logits is not None:
        device, dtype = logits.device, logits.dtype
    on_gpu = device.type == "cuda"
    if impl == "auto" and not on_gpu:
        return "torch"  # the PyTorch path is the CPU implementation
    if not on_gpu and not interpreting():
        raise ValueError(f"impl='triton' needs CUDA logits (or TRITON_INTERPRET=1, Triton's CPU "
                         f"interpreter, for tests); got logits on {device}")
    problem = triton_problem() or _FAILED.get(device.type)
    if problem is None and dtype not in SUPPORTED_DTYPES:
        problem = f"dtype {dtype} is not supported (fp32, fp16, bf16)"
    if problem is None and logits is not None and not logits.is_contiguous():
        problem = (f"logits must be contiguous, got shape {tuple(logits.shape)} with strides "
                   f"{logits.stride()}")
    if problem is None and k_local > MAX_TRITON_TOP_K:
        problem = f"top_k {k_local} per rank exceeds the Triton kernel's {MAX_TRITON_TOP_K}"
    if problem is None:
        return "triton"
    if impl == "triton":
        cls = RuntimeError if problem.startswith("triton") else ValueError
        raise cls(f"impl='triton': {problem}")
    _log_fallback(problem)
    return "torch"


@functools.lru_cache(maxsize=16)
def _log_fallback(problem: str) -> None:  # once per distinct reason
    log.warning("vocab_parallel_eaft_cross_entropy: using the PyTorch path: %s", problem)


_FAILED: dict[str, str] = {}  # device type -> why the kernels failed to compile or launch


def with_fallback(impl: str, device: torch.device, run_triton, run_torch):
    """``run_triton()``; with ``impl="auto"``, an exception raised by Triton itself (compiling or
    launching the kernels: nothing has been written yet) switches this process to the PyTorch
    path for ``device``'s type, with a log line, and returns ``run_torch()``."""
    try:
        return run_triton()
    except Exception as e:  # noqa: BLE001 - filtered below
        if impl != "auto" or not type(e).__module__.startswith("triton"):
            raise
        _FAILED[device.type] = f"the Triton kernels failed: {type(e).__name__}: {str(e)[:300]}"
        _log_fallback(_FAILED[device.type])
    return run_torch()


@functools.lru_cache(maxsize=1)
def _kernels():
    """Compile-on-first-use kernel definitions (so that importing this module needs no Triton,
    and ``TRITON_INTERPRET`` is read when the tests have set it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def eaft_partials_kernel(x_ptr, x_stride, label_ptr, part_ptr, part_stride, V, top_offset,
                             BLOCK: tl.constexpr, KP: tl.constexpr, K_LOCAL: tl.constexpr,
                             FULL: tl.constexpr, TOP: tl.constexpr, COL_TOPK: tl.constexpr,
                             FEW: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = x_ptr + row * x_stride
        lanes = tl.arange(0, BLOCK)
        m = float("-inf")  # running max
        s = -1.0  # sum exp(z - m) - 1 (-1 while every logit so far is -inf)
        t = 0.0  # sum exp(z - m) (z - m)
        arg = 0  # first index of the max (0 when all -inf, as torch.argmax)
        if KP > 0:
            run = tl.full([KP], float("-inf"), tl.float32)
            k_lanes = tl.arange(0, KP)
        for off in range(0, V, BLOCK):
            cols = off + lanes
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            bm = tl.max(x, axis=0)
            bi = tl.argmax(x, axis=0, tie_break_left=True)
            m_new = tl.maximum(m, bm)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            a = tl.exp(m - shift)  # 0 while m = -inf; 1 while the max is unchanged
            e = tl.exp(x - shift)
            is_new = bm > m
            if FULL:
                d = tl.where(e > 0, e * (x - shift), 0.0)  # p log p -> 0 for -inf logits
                kept = tl.where(m == float("-inf"), 0.0, a * (t + (m - m_new) * (s + 1.0)))
                t = kept + tl.sum(d, axis=0)
            # the block's first maximum becomes the row's "1" when it is a new maximum
            others = tl.sum(tl.where(lanes == bi, 0.0, e), axis=0)
            s = tl.where(is_new, a * s + a + others, s + tl.sum(e, axis=0))
            arg = tl.where(is_new, bi + off, arg)
            m = m_new
            if KP > 0:
                if off == 0:
                    run = tl.topk(x, KP)
                else:
                    kth = tl.min(run, axis=0)
                    above = tl.sum((x > kth).to(tl.int32), axis=0)  # may enter the top-K'
                    if above > FEW:  # the block's own top-K', merged with the running one
                        cand = tl.reshape(tl.join(run, tl.topk(x, KP)), [2 * KP])
                        run = tl.topk(cand, KP)
                    elif above > 0:  # a few: each replaces the running minimum if larger
                        xa = tl.where(x > kth, x, float("-inf"))
                        for _ in range(above):
                            v = tl.max(xa, axis=0)
                            xa = tl.where(lanes == tl.argmax(xa, axis=0, tie_break_left=True),
                                          float("-inf"), xa)
                            low = tl.argmin(run, axis=0, tie_break_left=True)
                            run = tl.where(k_lanes == low, tl.maximum(run, v), run)
        label = tl.load(label_ptr + row)  # local column of the label, -1 if not on this rank
        z_label = tl.load(row_ptr + tl.maximum(label, 0), mask=label >= 0, other=0.0)
        out = part_ptr + row * part_stride
        tl.store(out, m)
        tl.store(out + 1, s)
        tl.store(out + 2, z_label.to(tl.float32))
        if FULL:
            tl.store(out + 3, t)
        if KP > 0:
            if K_LOCAL < KP:  # the K_LOCAL largest of the (unordered) running top-K'
                run = tl.topk(run, KP)
            tl.store(out + COL_TOPK + k_lanes, run, mask=k_lanes < K_LOCAL)
        if TOP:
            tl.store(out + COL_TOPK + K_LOCAL, (arg + top_offset).to(tl.float32))

    @triton.jit
    def eaft_grad_kernel(x_ptr, x_stride, g_ptr, g_stride, label_ptr, coef_ptr, max_ptr,
                         scale_ptr, V, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        g_row = g_ptr + row * g_stride
        lanes = tl.arange(0, BLOCK)
        coef = tl.load(coef_ptr + row)  # upstream gradient x gate weight (0: ignored token)
        label = tl.load(label_ptr + row)
        m = tl.load(max_ptr + row)
        shift = tl.where(m == float("-inf"), 0.0, m)
        scale = coef * tl.load(scale_ptr + row)  # coef exp(m_r - M) / S
        for off in range(0, V, BLOCK):
            cols = off + lanes
            inside = cols < V
            if coef == 0.0:
                g = tl.zeros([BLOCK], tl.float32)
            else:
                x = tl.load(x_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
                g = tl.exp(x - shift) * scale
                g = tl.where(cols == label, g - coef, g)
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=inside)

    return eaft_partials_kernel, eaft_grad_kernel


# A block with at most this many values above the running K'-th inserts them one by one (a max
# and an argmin each) instead of a bitonic top-K' of the whole block (log2(K') (log2(K') + 1) / 2
# compare-and-swap passes over it): after the first blocks of a row, most blocks have 0-4.
_FEW = 8


def block_size(vocab_local: int, kp: int) -> int:
    """Logits per block. GPU: 4096 (2048 when a top-K is kept; untuned). Under the interpreter:
    64 (at least K'), so that test rows of a few hundred logits span several blocks."""
    if interpreting():
        return max(64, kp)
    return max(min(2048 if kp else 4096, _next_pow2(vocab_local)), kp, 16)


def eaft_partials(logits_2d: torch.Tensor, label_local: torch.Tensor, partials: torch.Tensor, *,
                  k_local: int, full: bool, top_offset: int | None) -> None:
    """Fill ``partials`` [N, C] (the columns of ``vocab_parallel.partial_columns``) from
    ``logits_2d`` [N, V_l] (rows contiguous) in one pass. ``label_local`` [N] int64: the label's
    column on this rank, -1 where this rank does not own it (or the token is ignored)."""
    n, vocab_local = logits_2d.shape
    if n == 0:
        return
    kp = _next_pow2(max(k_local, 2)) if k_local else 0
    partials_kernel, _ = _kernels()
    partials_kernel[(n,)](
        logits_2d, logits_2d.stride(0), label_local, partials, partials.stride(0), vocab_local,
        0 if top_offset is None else top_offset,
        BLOCK=block_size(vocab_local, kp), KP=kp, K_LOCAL=k_local, FULL=full,
        TOP=top_offset is not None, COL_TOPK=4 if full else 3, FEW=_FEW,
        num_warps=8 if logits_2d.device.type == "cuda" else 1,
    )


def eaft_grad(logits_2d: torch.Tensor, out_2d: torch.Tensor, label_local: torch.Tensor,
              coef: torch.Tensor, local_max: torch.Tensor, softmax_scale: torch.Tensor) -> None:
    """``out_2d = coef (softmax(z) - onehot(label))`` in ``out_2d``'s dtype; ``out_2d`` may be
    ``logits_2d`` itself. ``coef`` [N] fp32 (upstream gradient x weight), ``local_max`` [N]
    and ``softmax_scale`` [N]: softmax = exp(z - m_r) * scale."""
    n, vocab_local = logits_2d.shape
    if n == 0:
        return
    _, grad_kernel = _kernels()
    grad_kernel[(n,)](
        logits_2d, logits_2d.stride(0), out_2d, out_2d.stride(0), label_local,
        coef.contiguous(), local_max.contiguous(), softmax_scale.contiguous(),
        vocab_local, BLOCK=block_size(vocab_local, 0),
        num_warps=8 if logits_2d.device.type == "cuda" else 1,
    )


class TritonVocabParallelEAFT(torch.autograd.Function):
    """The Triton twin of ``vocab_parallel._VocabParallelEAFT`` (same arguments and outputs, plus
    ``inplace_backward``); saves the logits themselves for backward, no working buffer."""

    @staticmethod
    def forward(ctx, logits, target, loss_type, top_k, alpha, entropy_mode, ignore_index, group,
                need_entropy, want_top, inplace_backward):
        rank, world = _group_rank_size(group)
        vocab_local = logits.shape[-1]
        logits_2d = logits.view(-1, vocab_local)  # contiguous (checked by resolve_impl)
        target_1d = target.reshape(-1)
        valid, owned, local_index = label_layout(target_1d, rank=rank, vocab_local=vocab_local,
                                                 ignore_index=ignore_index)
        label_local = torch.where(owned, local_index, -1)
        want_full = need_entropy and entropy_mode == "full"
        k_local = min(top_k, vocab_local) if need_entropy and entropy_mode == "topk" else 0
        partials = torch.empty(logits_2d.shape[0], partial_columns(full=want_full,
                                                                   k_local=k_local,
                                                                   top=want_top),
                               dtype=torch.float32, device=logits.device)
        eaft_partials(logits_2d, label_local, partials, k_local=k_local, full=want_full,
                      top_offset=rank * vocab_local if want_top else None)
        gathered = _all_gather_partials(partials, group, world)  # the one collective
        merged = merge_partials(gathered, rank=rank, full=want_full, k_local=k_local,
                                top_k=top_k, top=want_top)
        weight, loss = weighted_loss(merged, valid, loss_type=loss_type, top_k=top_k,
                                     alpha=alpha)
        ctx.save_for_backward(logits, partials[:, 0].contiguous(), merged.softmax_scale, weight,
                              label_local)
        ctx.inplace_backward = inplace_backward
        return token_outputs(ctx, merged, weight, loss, valid, target.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *unused_stat_grads):
        logits, local_max, softmax_scale, weight, label_local = ctx.saved_tensors
        logits_2d = logits.view(-1, logits.shape[-1])
        coef = grad_loss.reshape(-1).to(torch.float32) * weight  # 0 for ignored tokens
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        eaft_grad(logits_2d, grad.view(logits_2d.shape), label_local, coef, local_max,
                  softmax_scale)
        return (grad,) + (None,) * 10
