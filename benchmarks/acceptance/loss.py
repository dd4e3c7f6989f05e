"""Stage loss: ``vocab_parallel_eaft_cross_entropy`` against a float64 reference, and
``fused_linear_eaft_cross_entropy`` against the unfused path, on the device."""

from __future__ import annotations

import math

from .common import Profile, Stage, compare, fmt, rel_max, single_rank_group, strict_fp32


def _reference_chunked(x, target, grad_out, *, loss_type, entropy, rows):
    """float64 reference of loss / statistics / gradient, ``rows`` tokens at a time (the
    definitions of EAFT.md; weights detached). Yields (r0, r1, loss, p, h, w, grad)."""
    import torch

    for r0 in range(0, x.shape[0], rows):
        r1 = min(r0 + rows, x.shape[0])
        z = x[r0:r1].double().requires_grad_()
        t = target[r0:r1]
        valid = t != -100
        safe = torch.where(valid, t, torch.zeros_like(t))
        logp = torch.log_softmax(z, dim=-1)
        ce = -logp.gather(-1, safe[:, None]).squeeze(-1)
        with torch.no_grad():
            p = torch.exp(-ce)
            if entropy == "topk":
                q = torch.softmax(z.topk(20, dim=-1).values, dim=-1)
            else:
                q = torch.exp(logp)
            h = -torch.xlogy(q, q).sum(-1)
            del q
            w = {"sft": torch.ones_like(ce), "dft": p,
                 "eaft": torch.clamp(h / math.log(20), max=1.0)}[loss_type]
            zero = torch.zeros_like(ce)
            w, p, h = (torch.where(valid, v, zero) for v in (w, p, h))
        loss = torch.where(valid, w * ce, torch.zeros_like(ce))
        (grad,) = torch.autograd.grad((loss * grad_out[r0:r1].double()).sum(), z)
        yield r0, r1, loss.detach(), p, h, w, grad
        del z, logp, ce, grad


def _loss_inputs(n, v, device, seed=0):
    """fp32 logits [n, v] (N(0, 3^2)) with some confident-conflict rows (one logit +25 away
    from the label) and ~25 % ignored labels, drawn on the device."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, v, generator=gen, device=device) * 3.0
    target = torch.randint(0, v, (n,), generator=gen, device=device)
    confident = torch.arange(0, n, max(1, n // 64), device=device)
    logits[confident, (target[confident] + 1) % v] += 25.0
    ignored = torch.rand(n, generator=gen, device=device) < 0.25
    target = torch.where(ignored, torch.full_like(target, -100), target)
    grad_out = torch.rand(n, generator=gen, device=device) + 0.5  # arbitrary upstream gradient
    return logits, target, grad_out


def _check_op(stage, x, target, grad_out, *, s, b, dtype_name, loss_type, entropy, group,
              impl="torch"):
    import torch

    from eaft_megatron import vocab_parallel_eaft_cross_entropy

    n, v = x.shape
    kind = "op" if impl == "torch" else impl
    with stage.check(f"{kind} {dtype_name} {loss_type}/{entropy}") as rec:
        before = x.clone()
        logits = x.view(s, b, v).requires_grad_()
        loss, stats = vocab_parallel_eaft_cross_entropy(
            logits, target.view(s, b), loss_type=loss_type, entropy=entropy, tp_group=group,
            return_stats=True, impl=impl)
        (loss * grad_out.view(s, b)).sum().backward()
        grad = logits.grad.view(n, v)
        problems = []
        if loss.dtype != torch.float32 or grad.dtype != x.dtype:
            problems.append(f"dtypes loss {loss.dtype} grad {grad.dtype}")
        if not torch.equal(x, before):
            problems.append("input logits modified")
        del before
        if bool((loss.view(-1)[target == -100] != 0).any()):
            problems.append("ignored tokens have a non-zero loss")
        gkey = f"op_grad_{dtype_name}"
        tols = {k: stage.tol(k) for k in ("op_loss", "op_weight", "op_entropy", gkey)}
        worst = {k: 0.0 for k in ("loss", "weight", "prob", "entropy", "grad")}
        maxabs = dict(worst)
        flat = {k: getattr(stats, k).reshape(-1) for k in ("weight", "target_prob", "entropy")}
        budget = (1 << 30) if x.device.type == "cuda" else (64 << 20)
        rows = max(1, budget // (8 * v))  # float64 bytes per reference chunk
        for r0, r1, ref_loss, ref_p, ref_h, ref_w, ref_grad in _reference_chunked(
                x, target, grad_out, loss_type=loss_type, entropy=entropy, rows=rows):
            pairs = (("loss", loss.reshape(-1)[r0:r1], ref_loss, "op_loss"),
                     ("weight", flat["weight"][r0:r1], ref_w, "op_weight"),
                     ("prob", flat["target_prob"][r0:r1], ref_p, "op_weight"),
                     ("entropy", flat["entropy"][r0:r1], ref_h, "op_entropy"),
                     ("grad", grad[r0:r1], ref_grad, gkey))
            for name, a, e, key in pairs:
                if name == "weight" and loss_type == "sft":
                    continue
                m, wv = compare(a, e, **tols[key])
                maxabs[name] = max(maxabs[name], m)
                worst[name] = max(worst[name], wv)
        bad = [k for k, wv in worst.items() if not wv <= 1.0]
        problems += [f"{k} off (max |err| {fmt(maxabs[k])}, {worst[k]:.2g}x tolerance)"
                     for k in bad]
        detail = (f"N={n} V={v}: max |err| loss {fmt(maxabs['loss'])}, grad "
                  f"{fmt(maxabs['grad'])}, entropy {fmt(maxabs['entropy'])} "
                  f"(worst {max(worst.values()):.2g}x tolerance)")
        rec.verdict(not problems, "; ".join(problems) or detail, worst=max(worst.values()),
                    **{f"max_abs_{k}": val for k, val in maxabs.items()})
        del logits, loss, stats, grad


def _check_fused(stage, device, dtype_name, P, group):
    import torch

    from eaft_megatron import fused_linear_eaft_cross_entropy, vocab_parallel_eaft_cross_entropy

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    s, b, hsize, v = P.fused_check
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(s, b, hsize, generator=gen, device=device).to(dtype)
    weight = torch.randn(v, hsize, generator=gen, device=device) / hsize ** 0.5
    weight[: max(1, v // 1000)] *= 8  # some confident rows
    weight = weight.to(dtype)
    target = torch.randint(0, v, (s, b), generator=gen, device=device)
    target[: s // 8] = -100
    mask = (target != -100).float()
    upstreams = {"megatron": mask / mask.sum(),  # one constant on supervised tokens
                 "arbitrary": torch.rand(s, b, generator=gen, device=device) + 0.5}
    suffix = "bf16" if dtype_name == "bf16" else "fp32"
    ltol, gtol = stage.tol(f"fused_loss_{suffix}"), stage.tol(f"fused_grad_rel_{suffix}")
    mean_tol = stage.tol("fused_loss_mean_bf16") if dtype_name == "bf16" else None

    def run(fn, g, **kw):
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        loss = fn(h, w, **kw)
        (loss * g).sum().backward()
        return loss.detach(), h.grad, w.grad

    for loss_type, entropy in (("sft", "topk"), ("dft", "topk"), ("eaft", "topk"),
                               ("eaft", "full")):
        for up, g in upstreams.items():
            with stage.check(f"fused {dtype_name} {loss_type}/{entropy} {up} upstream") as rec:
                kw = dict(loss_type=loss_type, entropy=entropy, tp_group=group)
                ref = run(lambda h, w: vocab_parallel_eaft_cross_entropy(h @ w.t(), target, **kw),
                          g)
                got = run(lambda h, w: fused_linear_eaft_cross_entropy(h, w, target, **kw), g)
                lmax, lworst = compare(got[0], ref[0], **ltol)
                lmean = (got[0] - ref[0]).abs().mean().item()
                rel_h, rel_w = rel_max(got[1], ref[1]), rel_max(got[2], ref[2])
                problems = []
                if not lworst <= 1.0:
                    problems.append(f"loss max |err| {fmt(lmax)} ({lworst:.2g}x tolerance)")
                if mean_tol is not None and not lmean <= mean_tol:
                    problems.append(f"loss mean |err| {fmt(lmean)} > {fmt(mean_tol)}")
                if not (rel_h <= gtol and rel_w <= gtol):
                    problems.append(f"grad rel err hidden {fmt(rel_h)} weight {fmt(rel_w)} "
                                    f"> {fmt(gtol)}")
                if got[1].dtype != dtype or got[2].dtype != dtype:
                    problems.append(f"grad dtypes {got[1].dtype}, {got[2].dtype}")
                rec.verdict(not problems, "; ".join(problems) or
                            f"N={s * b} h={hsize} V={v}: loss max |err| {fmt(lmax)} mean "
                            f"{fmt(lmean)}, grad rel err hidden {fmt(rel_h)} weight "
                            f"{fmt(rel_w)}",
                            loss_max_abs=lmax, loss_mean_abs=lmean, grad_rel_hidden=rel_h,
                            grad_rel_weight=rel_w)
                del ref, got


def stage_loss(stage: Stage, device, P: Profile) -> None:
    import torch

    strict_fp32()
    group = single_rank_group(device)
    s, b, v = P.loss_shape
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        logits, target, grad_out = _loss_inputs(s * b, v, device)
        x = logits.to(dtype)
        del logits
        for loss_type in ("sft", "dft", "eaft"):
            for entropy in ("topk", "full"):
                _check_op(stage, x, target, grad_out, s=s, b=b, dtype_name=dtype_name,
                          loss_type=loss_type, entropy=entropy, group=group)
        del x, target, grad_out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _check_triton(stage, device, P, group)
    for dtype_name in ("fp32", "bf16"):
        _check_fused(stage, device, dtype_name, P, group)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _check_triton(stage, device, P: Profile, group) -> None:
    """The Triton kernels (``impl="triton"``) against the same float64 reference. CPU: under
    Triton's interpreter (the driver sets ``TRITON_INTERPRET=1``), which has no bf16
    arithmetic: fp32 for every mode and fp16 for eaft/full instead of bf16."""
    import torch

    from eaft_megatron.ops.triton_eaft import interpreting, triton_problem

    problem = triton_problem()
    if device.type != "cuda" and not interpreting():
        problem = "on CPU only under TRITON_INTERPRET=1"
    if problem:
        stage.info("triton", None, f"Triton path not checked: {problem}")
        return
    s, b, v = P.triton_loss_shape
    half = ("bf16", torch.bfloat16) if device.type == "cuda" else ("fp16", torch.float16)
    for dtype_name, dtype in (("fp32", torch.float32), half):
        logits, target, grad_out = _loss_inputs(s * b, v, device, seed=1)
        x = logits.to(dtype)
        del logits
        for loss_type in ("sft", "dft", "eaft"):
            for entropy in ("topk", "full"):
                if device.type != "cuda" and dtype_name == "fp16" and loss_type != "eaft":
                    continue  # the interpreter is slow; the kernels are the same per mode
                _check_op(stage, x, target, grad_out, s=s, b=b, dtype_name=dtype_name,
                          loss_type=loss_type, entropy=entropy, group=group, impl="triton")
        del x, target, grad_out
        if device.type == "cuda":
            torch.cuda.empty_cache()
