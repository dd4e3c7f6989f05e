"""The Triton path of vocab_parallel_eaft_cross_entropy (impl="triton") on CPU, under Triton's
interpreter, against the float64 oracle and against the PyTorch path, at tp=1 and tp=2 (gloo).

The kernels run with ``TRITON_INTERPRET=1``, in spawned worker processes that start with it in
their environment (Triton reads it when it is imported), so this test process and the rest of the
suite are unaffected. The
interpreter has no bf16 arithmetic (it handles bf16 as raw 16-bit integers and compares their
bits: silently wrong), so these tests use fp32 and fp16 logits; bf16 is only tested on a GPU
(``benchmarks/gpu_acceptance.py``). The interpreter is slow (about 0.1 s per ``tl.topk``), so the
cases are small: rows of 96-128 logits per rank, in blocks of 64 (every row spans several
blocks). Both ways the running top-K' takes a block in (a bitonic merge, or inserting a few
values one by one) are exercised (rows 3-8 / row 9 of ``_edge_case``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from eaft_megatron import vocab_parallel_eaft_cross_entropy
from tests.ops.reference import make_case, reference_eaft

from tests.support.launch import spawn

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")
INTERPRET = {"TRITON_INTERPRET": "1"}
STAT_FIELDS = ("cross_entropy", "target_prob", "entropy", "weight", "mask", "top_token")


def _edge_case(world: int, vocab_local: int):
    """[11, world * vocab_local] fp64 logits covering the edge cases, and labels."""
    vocab = world * vocab_local
    logits, target = make_case(3, 11, vocab)  # confident-conflict rows 0-3, ~25 % ignored
    last = vocab_local * (world - 1)  # the last rank's first column
    logits[4, last:last + 40] += 30.0  # the last rank's shard holds the whole top-K
    logits[5, 7:12] = 9.0  # ties inside the top-K (and for the argmax, first index wins)
    logits[5, last + 3] = 9.0  # ... and across ranks
    # all -inf on rank 0 (a masked shard; at tp=1 the row's first half)
    logits[6, :vocab_local if world > 1 else vocab_local // 2] = float("-inf")
    logits[7, ::3] = float("-inf")  # -inf logits scattered over every rank and block
    logits[8, :] = 0.5  # a uniform row: H_topK = ln K exactly, all ties
    # descending logits with a few spikes in each shard's second block, one tying the shard's
    # maximum: the "few values above the running K'-th" insertion path, with ties
    logits[9] = torch.linspace(6.0, -6.0, vocab, dtype=torch.float64)
    for r in range(world):
        logits[9, r * vocab_local + 70] = logits[9, r * vocab_local]
        logits[9, r * vocab_local + 80] = logits[9, r * vocab_local + 5]
    target[6] = vocab - 1  # a label the masked rank does not own
    target[7] = 1  # a label with a finite logit (column 0 is -inf)
    target[10] = -100
    return logits, target


def _run(impl, x, target, grad_out, group, **kw):
    logits = x.clone().requires_grad_()
    loss, stats = vocab_parallel_eaft_cross_entropy(logits, target, tp_group=group,
                                                    return_stats=True, impl=impl, **kw)
    (loss * grad_out).sum().backward()
    return loss.detach(), stats, logits.grad


def _compare(rank, world, group, x_full, target, *, what, dtype=torch.float32, tol=2e-5,
             grad_tol=2e-6, **kw):
    """Triton vs the float64 oracle and vs the PyTorch path on this rank's shard."""
    x = x_full.to(dtype)
    vl = x.shape[1] // world
    shard = x[:, rank * vl:(rank + 1) * vl].contiguous()
    grad_out = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(5)) + 0.5
    before = shard.clone()
    loss, stats, grad = _run("triton", shard, target, grad_out, group, **kw)
    assert torch.equal(shard, before), f"{what}: input logits modified"
    assert loss.dtype == torch.float32 and grad.dtype == dtype, what

    z = x.double().requires_grad_()
    ref_loss, ref_p, ref_h, ref_w = reference_eaft(z, target, **kw)
    (ref_loss * grad_out.double()).sum().backward()
    ignored = target == kw.get("ignore_index", -100)
    close = dict(atol=tol, rtol=tol)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **close,
                               msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(stats.weight.double(), ref_w, **close,
                               msg=lambda m: f"{what} weight: {m}")
    torch.testing.assert_close(stats.target_prob.double(), ref_p, **close,
                               msg=lambda m: f"{what} p: {m}")
    torch.testing.assert_close(stats.entropy.double(), ref_h, atol=1e-4, rtol=1e-4,
                               msg=lambda m: f"{what} entropy: {m}")
    assert torch.equal(stats.top_token, torch.where(ignored, -1, x.argmax(dim=1))), what
    torch.testing.assert_close(grad.double(), z.grad[:, rank * vl:(rank + 1) * vl],
                               atol=grad_tol, rtol=grad_tol * 4,
                               msg=lambda m: f"{what} grad: {m}")

    t_loss, t_stats, t_grad = _run("torch", shard, target, grad_out, group, **kw)
    torch.testing.assert_close(loss, t_loss, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")
    for name in STAT_FIELDS:
        a, b = getattr(stats, name), getattr(t_stats, name)
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"{what} {name} vs torch: {m}")
        else:
            assert torch.equal(a, b), f"{what} {name} vs torch"
    torch.testing.assert_close(grad, t_grad, atol=grad_tol, rtol=grad_tol * 4,
                               msg=lambda m: f"{what} grad vs torch: {m}")


def _worker(rank, world):
    """tp=2 cases on both ranks together, then tp=1 cases split between the two processes."""
    import torch.distributed as dist

    group = dist.group.WORLD
    # Every loss type x entropy mode on a few rows (the kernels see the same flags for the three
    # loss types: the weight is the shared PyTorch code), then the edge cases.
    x, target = _edge_case(world, 96)
    for loss_type in ("sft", "dft", "eaft"):
        for entropy in ("topk", "full"):
            rows = slice(None) if loss_type == "eaft" else slice(3, 7)
            _compare(rank, world, group, x[rows], target[rows], loss_type=loss_type,
                     entropy=entropy, what=f"tp2 {loss_type}/{entropy}")
    for top_k in (2, 64):
        rows = slice(None) if top_k == 2 else slice(3, 10)  # the edge rows
        _compare(rank, world, group, x[rows], target[rows], top_k=top_k,
                 what=f"tp2 eaft k{top_k}")
    # ignore_index other than -100, and no tokens at all
    t7 = torch.where(target == -100, 7, target)
    t7[2] = 7
    _compare(rank, world, group, x, t7, ignore_index=7, entropy="full",
             what="tp2 ignore_index=7")
    _compare(rank, world, group, x[:0], target[:0], what="tp2 N=0")

    # tp=1, one process each
    x1, t1 = _edge_case(1, 128)
    if rank == 0:
        _compare(0, 1, None, x1[4:10], t1[4:10], top_k=20, what="tp1 eaft/topk k20")
        _compare(0, 1, None, x1, t1, dtype=torch.float16, tol=2e-5, grad_tol=1e-3,
                 loss_type="dft", entropy="full", what="tp1 fp16 dft/full")
    else:
        _compare(0, 1, None, x1[3:6], t1[3:6], top_k=64, loss_type="sft", what="tp1 sft k64")
        _check_inplace_and_errors(x1.float(), t1)
    _check_fused(rank)
    return True


def _check_fused(rank):
    """The fused output layer + loss with the Triton kernels (gradient written over each chunk's
    logits) against its PyTorch path: same loss, statistics and gradients; padded vocabulary."""
    from eaft_megatron import fused_linear_eaft_cross_entropy

    gen = torch.Generator().manual_seed(11)
    s, b, h, vocab = 4, 2, 16, 100
    hidden = torch.randn(s, b, h, generator=gen)
    weight = torch.randn(vocab, h, generator=gen) * 0.6
    weight[3] *= 8
    target = torch.randint(0, 90, (s, b), generator=gen)
    target[0, 0] = -100
    grad = torch.rand(s, b, generator=gen) + 0.5  # arbitrary upstream: the recompute path too
    kw = dict(loss_type=("eaft", "dft")[rank], entropy="full", chunk_tokens=3, vocab_size=90,
              return_stats=True)
    out = {}
    for impl in ("triton", "torch"):
        for g in (grad, (target != -100).float() * 0.25):  # arbitrary, Megatron's constant
            hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss, stats = fused_linear_eaft_cross_entropy(hh, ww, target, impl=impl, **kw)
            (loss * g).sum().backward()
            out.setdefault(impl, []).append((loss, *stats, hh.grad, ww.grad))
    for got, ref in zip(out["triton"], out["torch"]):
        for a, e in zip(got, ref):
            if a.is_floating_point():
                torch.testing.assert_close(a, e, atol=2e-5, rtol=2e-5)
            else:
                assert torch.equal(a, e)


def _check_inplace_and_errors(x, target):
    # inplace_backward: the gradient is written over the logits' own storage
    ref = x.clone().requires_grad_()
    vocab_parallel_eaft_cross_entropy(ref, target, impl="triton").sum().backward()
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # an intermediate, as the fused output layer's logits
    loss = vocab_parallel_eaft_cross_entropy(logits, target, impl="triton",
                                             inplace_backward=True)
    loss.sum().backward()
    assert torch.equal(logits.detach(), ref.grad), "gradient not written over the logits"
    assert torch.equal(leaf.grad, ref.grad)
    # what the Triton path refuses, in one line each; impl="auto" on CPU is the torch path
    bad = [(dict(logits=x.double()), ValueError, "dtype torch.float64"),
           (dict(logits=torch.cat([x, x], 1)[:, ::2]), ValueError, "contiguous"),
           (dict(logits=torch.cat([x, x], 1), top_k=129), ValueError, "exceeds")]
    for change, exc, match in bad:
        kw = dict(logits=x, top_k=20) | change
        with pytest.raises(exc, match=match) as info:
            vocab_parallel_eaft_cross_entropy(kw.pop("logits"), target, impl="triton", **kw)
        assert "\n" not in str(info.value)
    auto = vocab_parallel_eaft_cross_entropy(x, target, impl="auto")
    torch.testing.assert_close(auto, vocab_parallel_eaft_cross_entropy(x, target, impl="torch"),
                               atol=0, rtol=0)


def test_triton_matches_reference_and_torch_path_tp1_tp2(monkeypatch):
    # In the environment the workers start with: importing this module (torch._dynamo, through
    # torch.compiler.disable) already imports Triton, which reads TRITON_INTERPRET then.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert spawn(_worker, 2, env=INTERPRET) == [True, True]


def test_impl_option_errors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, target = make_case(0, 4, 32)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA logits"):
        vocab_parallel_eaft_cross_entropy(logits.float(), target, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        vocab_parallel_eaft_cross_entropy(logits.float(), target, impl="cuda")
    # the PyTorch path is the CPU implementation of impl="auto"
    loss = vocab_parallel_eaft_cross_entropy(logits.float(), target)
    ref, *_ = reference_eaft(logits.float().double(), target)
    torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)


def test_eaft_impl_flag_reaches_the_loss_config():
    import argparse

    from eaft_megatron.megatron import EAFTLossConfig, add_eaft_args

    parser = add_eaft_args(argparse.ArgumentParser())
    assert EAFTLossConfig.from_args(parser.parse_args([])).impl == "auto"
    assert EAFTLossConfig.from_args(parser.parse_args(["--eaft-impl", "torch"])).impl == "torch"
    with pytest.raises(SystemExit):
        parser.parse_args(["--eaft-impl", "cuda"])
    with pytest.raises(ValueError, match="impl must be one of"):
        EAFTLossConfig(impl="cuda")


def test_auto_falls_back_on_cuda_with_a_log_line(monkeypatch, caplog):
    """What impl="auto" does on a CUDA device when the Triton path cannot run (decided from the
    device type, dtype and layout alone, so it is testable without a GPU)."""
    from eaft_megatron.ops import triton_eaft

    cuda = dict(device=torch.device("cuda"), k_local=20)
    assert triton_eaft.resolve_impl("auto", dtype=torch.bfloat16, **cuda) == "triton"
    assert triton_eaft.resolve_impl("torch", dtype=torch.bfloat16, **cuda) == "torch"
    caplog.set_level("WARNING", logger=triton_eaft.__name__)
    assert triton_eaft.resolve_impl("auto", dtype=torch.float64, **cuda) == "torch"
    assert triton_eaft.resolve_impl("auto", dtype=torch.float32, device=cuda["device"],
                                    k_local=200) == "torch"
    monkeypatch.setattr(triton_eaft, "triton_problem",
                        lambda: "triton 3.1.0 is too old (no tl.topk; need triton >= 3.2)")
    assert triton_eaft.resolve_impl("auto", dtype=torch.bfloat16, **cuda) == "torch"
    logged = [r.getMessage() for r in caplog.records]
    assert any("float64 is not supported" in m for m in logged), logged
    assert any("exceeds the Triton kernel's 128" in m for m in logged), logged
    assert any("too old" in m and "PyTorch path" in m for m in logged), logged
    with pytest.raises(RuntimeError, match="impl='triton': triton 3.1.0 is too old"):
        triton_eaft.resolve_impl("triton", dtype=torch.bfloat16, **cuda)


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter does not type-check like the compiler: compile the kernels to an sm_90
    cubin (H100/H200; Triton ships ptxas) for bf16 logits, no GPU needed. Not run: see
    gpu_acceptance.py."""
    from eaft_megatron.ops.triton_eaft import _kernels, interpreting

    if interpreting():
        pytest.skip("TRITON_INTERPRET is set in this process")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    partials_kernel, grad_kernel = _kernels()
    target = GPUTarget("cuda", 90, 32)
    sig = {"x_ptr": "*bf16", "x_stride": "i64", "label_ptr": "*i64", "part_ptr": "*fp32",
           "part_stride": "i32", "V": "i32", "top_offset": "i32"}
    consts = ("BLOCK", "KP", "K_LOCAL", "FULL", "TOP", "COL_TOPK", "FEW")
    sig |= dict.fromkeys(consts, "constexpr")
    for values in ((2048, 32, 20, False, True, 3, 8), (4096, 0, 0, True, True, 4, 8)):
        constexprs = {(len(sig) - len(consts) + i,): v for i, v in enumerate(values)}
        kernel = triton.compile(ASTSource(partials_kernel, sig, constexprs), target=target,
                                options={"num_warps": 8})
        assert kernel.asm["cubin"], values
    sig = {"x_ptr": "*bf16", "x_stride": "i64", "g_ptr": "*bf16", "g_stride": "i64",
           "label_ptr": "*i64", "coef_ptr": "*fp32", "max_ptr": "*fp32", "scale_ptr": "*fp32",
           "V": "i32", "BLOCK": "constexpr"}
    kernel = triton.compile(ASTSource(grad_kernel, sig, {(9,): 4096}), target=target,
                            options={"num_warps": 8})
    assert kernel.asm["cubin"]


def test_auto_falls_back_when_the_kernels_fail(monkeypatch, caplog):
    """impl="auto": an exception from Triton itself (compiling or launching the kernels, e.g. an
    unsupported GPU) switches the process to the PyTorch path with a log line; impl="triton"
    raises it. Simulated on CPU: resolve_impl is made to pick Triton, and the kernel launch to
    raise as Triton's compiler would."""
    from eaft_megatron import fused_linear_eaft_cross_entropy
    from eaft_megatron.ops import fused_linear, triton_eaft

    class CompilationError(Exception):
        pass

    CompilationError.__module__ = "triton.compiler.errors"

    def launch(*args, **kwargs):
        raise CompilationError("at 12:8: unsupported on this GPU (simulated)")

    def pick_triton(impl, logits=None, **kwargs):
        return "torch" if impl == "torch" else "triton"

    monkeypatch.setattr(triton_eaft, "_FAILED", {})
    for module in (triton_eaft, fused_linear):
        monkeypatch.setattr(module, "resolve_impl", pick_triton)
        monkeypatch.setattr(module, "eaft_partials", launch)
    caplog.set_level("WARNING", logger=triton_eaft.__name__)
    logits, target = make_case(0, 6, 40)
    for impl in ("auto", "triton"):
        x = logits.float().requires_grad_()
        if impl == "triton":
            with pytest.raises(CompilationError, match="simulated"):
                vocab_parallel_eaft_cross_entropy(x, target, impl=impl)
            continue
        loss = vocab_parallel_eaft_cross_entropy(x, target, impl=impl)
        ref = vocab_parallel_eaft_cross_entropy(logits.float(), target, impl="torch")
        assert torch.equal(loss, ref)
    assert any("Triton kernels failed: CompilationError" in r.getMessage()
               for r in caplog.records)
    hidden, weight = torch.randn(6, 1, 8), torch.randn(40, 8)
    t = target.view(6, 1)
    ref = fused_linear_eaft_cross_entropy(hidden, weight, t, impl="torch")
    assert torch.equal(fused_linear_eaft_cross_entropy(hidden, weight, t, impl="auto"), ref)
    with pytest.raises(CompilationError):
        fused_linear_eaft_cross_entropy(hidden, weight, t, impl="triton")
