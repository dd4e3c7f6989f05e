"""fused_linear_eaft_cross_entropy against the unfused path (output layer + the loss op).

Oracle: the full logits ``hidden @ weight.T`` on one device through
``vocab_parallel_eaft_cross_entropy`` (itself checked against float64 in test_vocab_parallel);
at tp=2 each rank compares its weight-gradient rows and its hidden-state gradient (its sequence
slice with sequence parallelism) with the same slices of the single-device gradients.
"""

from __future__ import annotations

import pytest
import torch

from eaft_megatron import fused_linear_eaft_cross_entropy, vocab_parallel_eaft_cross_entropy
from tests.support.launch import spawn

LOSS_TYPES = ("sft", "dft", "eaft")
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 2e-2)}  # (loss, grads) atol


def _case(seed, s=8, b=3, h=16, vocab=64, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=gen)
    weight = torch.randn(vocab, h, generator=gen) * 0.6
    weight[3] *= 8  # some confident rows
    target = torch.randint(0, vocab, (s, b), generator=gen)
    target[0] = -100
    target[3, 1] = -100
    return hidden.to(dtype), weight.to(dtype), target


def _unfused(hidden, weight, target, grad, **kw):
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_()
    loss = vocab_parallel_eaft_cross_entropy(h @ w.t(), target, tp_group=None, **kw)
    (loss * grad).sum().backward()
    return loss.detach(), h.grad, w.grad


def _upstream(target, kind):
    if kind == "megatron":  # sum(loss * mask) * c: one constant on supervised tokens
        return (target != -100).float() * 0.25
    return torch.rand(target.shape, generator=torch.Generator().manual_seed(7)) + 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("upstream", ["megatron", "arbitrary"])
def test_tp1_matches_unfused(loss_type, dtype, upstream):
    hidden, weight, target = _case(0, dtype=dtype)
    grad = _upstream(target, upstream)
    for entropy in ("topk", "full"):
        kw = dict(loss_type=loss_type, entropy=entropy)
        ref_loss, ref_h, ref_w = _unfused(hidden, weight, target, grad, **kw)
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        loss, stats = fused_linear_eaft_cross_entropy(h, w, target, chunk_tokens=5,
                                                      return_stats=True, **kw)
        (loss * grad).sum().backward()
        atol, gtol = TOL[dtype]
        torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=atol)
        assert h.grad.dtype == dtype and w.grad.dtype == dtype
        torch.testing.assert_close(h.grad.float(), ref_h, atol=gtol, rtol=gtol)
        torch.testing.assert_close(w.grad.float(), ref_w, atol=gtol, rtol=gtol)
        assert torch.equal(stats.mask, target != -100)
        assert torch.all(loss[target == -100] == 0)
        logits = (hidden @ weight.t()).float()
        assert torch.equal(stats.top_token, torch.where(target == -100, -1, logits.argmax(-1)))


def test_no_logits_sized_tensor_is_saved():
    hidden, weight, target = _case(1, s=32, b=4, vocab=256)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_eaft_cross_entropy(h, weight, target, chunk_tokens=16)
    n_logits = target.numel() * weight.shape[0]
    assert all(t.numel() < n_logits for t in loss.grad_fn.saved_tensors)


def test_bad_input():
    hidden, weight, target = _case(2)
    with pytest.raises(ValueError, match="target shape"):
        fused_linear_eaft_cross_entropy(hidden, weight, target[:-1])
    with pytest.raises(ValueError, match=r"weight must be \[V/tp, h=16\]"):
        fused_linear_eaft_cross_entropy(hidden, weight[:, :8], target)
    with pytest.raises(TypeError, match="dtypes differ"):
        fused_linear_eaft_cross_entropy(hidden, weight.double(), target)
    with pytest.raises(ValueError, match="token id 64 outside"):
        fused_linear_eaft_cross_entropy(hidden, weight, torch.full_like(target, 64))
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_linear_eaft_cross_entropy(hidden, weight, target, chunk_tokens=0)


def _tp2_worker(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    results = []
    for sequence_parallel in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for loss_type in LOSS_TYPES:
                for upstream in ("megatron", "arbitrary"):
                    hidden, weight, target = _case(3, dtype=dtype)
                    grad = _upstream(target, upstream)
                    ref_loss, ref_h, ref_w = _unfused(hidden, weight, target, grad,
                                                      loss_type=loss_type)
                    vl, sl = weight.shape[0] // world, hidden.shape[0] // world
                    w = weight[rank * vl:(rank + 1) * vl].clone().requires_grad_()
                    h_in = hidden[rank * sl:(rank + 1) * sl] if sequence_parallel else hidden
                    h = h_in.clone().requires_grad_()
                    loss, stats = fused_linear_eaft_cross_entropy(
                        h, w, target, sequence_parallel=sequence_parallel, chunk_tokens=5,
                        loss_type=loss_type, tp_group=group, return_stats=True)
                    top = (hidden @ weight.t()).float().argmax(-1)
                    assert torch.equal(stats.top_token, torch.where(target == -100, -1, top))
                    (loss * grad).sum().backward()
                    ref_h_here = ref_h[rank * sl:(rank + 1) * sl] if sequence_parallel else ref_h
                    atol, gtol = TOL[dtype]
                    what = (sequence_parallel, str(dtype), loss_type, upstream)
                    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=atol,
                                               msg=lambda m: f"{what} loss {m}")
                    torch.testing.assert_close(h.grad.float(), ref_h_here, atol=gtol, rtol=gtol,
                                               msg=lambda m: f"{what} grad hidden {m}")
                    torch.testing.assert_close(w.grad.float(), ref_w[rank * vl:(rank + 1) * vl],
                                               atol=gtol, rtol=gtol,
                                               msg=lambda m: f"{what} grad weight {m}")
                    results.append(what)
    return len(results)


def test_tp2_with_and_without_sequence_parallel():
    assert spawn(_tp2_worker, 2) == [24, 24]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tokens(dtype):
    """N = 0: empty loss of the target's shape; gradients of the right shapes and dtypes, zero
    for the weight (as the unfused path gives)."""
    for loss_type in LOSS_TYPES:
        for entropy in ("topk", "full"):
            h = torch.randn(0, 3, 16).to(dtype).requires_grad_()
            w = torch.randn(64, 16).to(dtype).requires_grad_()
            target = torch.zeros(0, 3, dtype=torch.long)
            loss, stats = fused_linear_eaft_cross_entropy(h, w, target, loss_type=loss_type,
                                                          entropy=entropy, return_stats=True)
            assert loss.shape == (0, 3) and all(s.shape == (0, 3) for s in stats)
            ref_loss, ref_h, ref_w = _unfused(h, w, target, torch.ones(0, 3),
                                              loss_type=loss_type, entropy=entropy)
            (loss * 2.0).sum().backward()
            assert h.grad.shape == h.shape and h.grad.dtype == dtype
            assert w.grad.dtype == dtype and torch.equal(w.grad.float(), ref_w)
            assert torch.equal(w.grad, torch.zeros_like(w)) and ref_loss.numel() == 0
