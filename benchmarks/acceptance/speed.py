"""Stage speed: the rows of ``bench_loss.py`` and ``bench_fused.py`` (imported) at the profile's
shapes, and the README's targets (checks on a GPU, information on CPU)."""

from __future__ import annotations

import math
import time

from .common import Profile, Stage, single_rank_group, sync


LOSS_TARGETS = {"sft": 1.0, "eaft_full": 1.0, "eaft_topk": 1.15,  # time vs megatron
                # the Triton kernels (issue 19's targets)
                "triton_eaft_topk": 0.50, "triton_eaft_full": 0.40}
TRITON_BYTES_PER_LOGIT = 2.0 * 1.02  # the bf16 gradient, plus the per-token partials
FUSED_TARGETS = dict(time=1.10, loss_part=1 / 16)  # fused_eaft vs unfused_eaft (both: impl auto)


def stage_speed(stage: Stage, device, P: Profile) -> None:
    import bench_fused
    import bench_loss
    import torch

    enforce = device.type == "cuda"  # CPU timings at smoke sizes are noise: information only
    group = single_rank_group(device)
    stage.info("targets_enforced", enforce,
               "README targets are checks" if enforce else "README targets reported, not checked")
    loss_rows, fused_rows = [], []
    stage.data["tables"]["loss"] = loss_rows
    stage.data["tables"]["fused"] = fused_rows

    on_gpu = device.type == "cuda"
    provs = bench_loss.providers(group, triton=on_gpu, liger=on_gpu)
    if not on_gpu:
        stage.info("triton_speed", None, "the Triton path is not timed on CPU (Triton's "
                   "interpreter); the loss stage checks its results")
    elif "liger" not in provs:
        stage.info("liger", None, "liger_kernel is not importable: no Liger-Kernel row")
    if not P.megatron_fused:
        del provs["megatron_fused"]
    for n, v in P.speed_loss_shapes:
        logits, target = bench_loss.make_inputs(n, v, torch.bfloat16, device)
        ok_provs = {}
        for name, fn in provs.items():  # a provider that cannot run is a FAIL, not a crash
            if name == "liger":  # an outside comparison: its failure is information
                try:
                    bench_loss.run_once(fn, logits, target)
                    ok_provs[name] = fn
                except Exception as e:  # noqa: BLE001
                    stage.info("liger", None, f"Liger-Kernel's CE failed: {str(e)[:200]}")
                continue
            with stage.check(f"loss {n}x{v} {name} runs") as rec:
                t0 = time.perf_counter()
                grad = bench_loss.run_once(fn, logits, target)
                sync(device)
                finite = bool(torch.isfinite(grad).all())
                rec.verdict(finite, f"first call {time.perf_counter() - t0:.1f} s (compile "
                                    f"included), gradient {'finite' if finite else 'NOT finite'}")
                ok_provs[name] = fn
                del grad
        if "megatron" not in ok_provs:
            continue
        rows = bench_loss.measure(ok_provs, logits, target, reps=P.speed_reps[0], device=device,
                                  dtype_name="bf16")
        loss_rows += rows
        stage.save()
        print(bench_loss.markdown_table(rows, bench_loss.HEADER), flush=True)
        by = {r["provider"]: r for r in rows}
        for name in [p for p in by if p.startswith("triton_")]:
            r = by[name]
            _target(stage, f"loss {n}x{v} {name} peak bytes per logit",
                    r["bytes_per_logit"] <= TRITON_BYTES_PER_LOGIT,
                    f"{r['bytes_per_logit']} bytes per logit (target <= 2: the gradient)",
                    enforce)
        if "triton_sft" in by:
            r = by["triton_sft"]
            if "liger" in by:
                ok = r["median_ms"] <= by["liger"]["median_ms"]
                _target(stage, f"loss {n}x{v} triton_sft vs liger", ok,
                        f"triton_sft {r['median_ms']} ms, liger {by['liger']['median_ms']} ms "
                        f"(target: no slower)", enforce)
        for r in rows:
            target_t = LOSS_TARGETS.get(r["provider"])
            if target_t is None:
                continue
            ok = (r["time_vs_megatron"] is not None and r["time_vs_megatron"] <= target_t
                  and r["peak_vs_megatron"] is not None and r["peak_vs_megatron"] <= 1.0)
            peak = "n/a" if r["peak_vs_megatron"] is None else f"{r['peak_vs_megatron']}x"
            text = (f"{r['provider']} {n}x{v}: time {r['time_vs_megatron']}x Megatron (target "
                    f"<= {target_t}), peak memory {peak} (target <= 1.0)")
            _target(stage, f"loss {n}x{v} {r['provider']} vs megatron", ok, text, enforce)
        del logits, target
        if device.type == "cuda":
            torch.cuda.empty_cache()

    fprovs = bench_fused.providers(group)
    n, hiddens, v = P.speed_fused
    for hsize in hiddens:
        with stage.check(f"fused {n}x{hsize}x{v} {P.speed_fused_dtype} runs") as rec:
            inputs = bench_fused.make_inputs(n, hsize, v, bench_fused.DTYPES[P.speed_fused_dtype],
                                             device)
            rows = bench_fused.measure(fprovs, *inputs, reps=P.speed_reps[1], device=device,
                                       dtype_name=P.speed_fused_dtype)
            del inputs
            fused_rows += rows
            finite = all(math.isfinite(r["median_ms"]) for r in rows)
            rec.verdict(finite, ", ".join(f"{r['provider']} {r['median_ms']} ms" for r in rows))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        by = {r["provider"]: r for r in fused_rows if r["hidden"] == hsize}
        if "fused_eaft" in by:
            r = by["fused_eaft"]
            ok = (r["time_vs_unfused"] <= FUSED_TARGETS["time"]
                  and r["loss_part_vs_unfused"] <= FUSED_TARGETS["loss_part"])
            text = (f"hidden {hsize}: time {r['time_vs_unfused']}x unfused (target <= "
                    f"{FUSED_TARGETS['time']}), loss-part memory {r['loss_part_vs_unfused']}x "
                    f"(target <= {FUSED_TARGETS['loss_part']:.3f})")
            _target(stage, f"fused h{hsize} vs unfused", ok, text, enforce)
    if fused_rows:
        print(bench_loss.markdown_table(fused_rows, bench_fused.HEADER), flush=True)
    stage.save()


def _target(stage: Stage, name: str, ok: bool, text: str, enforce: bool) -> None:
    if enforce:
        with stage.check(f"target {name}") as rec:
            rec.verdict(ok, text)
    else:
        stage.info(f"target {name}", dict(met=ok, text=text),
                   f"{'met' if ok else 'not met'}: {text}")
