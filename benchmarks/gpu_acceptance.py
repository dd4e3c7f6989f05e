"""GPU acceptance: one command that proves the GPU path (loss op, speed, models, trainer).

    python benchmarks/gpu_acceptance.py --out DIR                  # on a machine with CUDA GPUs
    python benchmarks/gpu_acceptance.py --out DIR --only loss,models
    python benchmarks/gpu_acceptance.py --out DIR --cpu-smoke      # the same stages on CPU, tiny

On a lent GPU machine that has torch, transformers, safetensors, tokenizers, sentencepiece,
tqdm, numpy, psutil but no megatron-core (wheels fetched beforehand by
``benchmarks/gpu_wheels.sh`` into ``.whl/``, carried with the working tree), from the repository
root, without installing this package::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_acceptance.py --out $OUT/acc

(torch stays the machine's own: ``.whl/`` never holds a torch wheel.) About 4-5 minutes on one
H200; ``--deadline`` (default 560 s) bounds the whole run: a stage gets at most its own timeout
and what is left, and a stage that runs out is killed and recorded as failed.

Stages (``--only loss,speed,models,train``; code in ``benchmarks/acceptance/``), each in its
own process (``--processes per-stage``, the default on GPU), so that an exception, a CUDA error
or a hang in one is a FAIL for it and the others still run:

loss    ``vocab_parallel_eaft_cross_entropy`` on the device against a float64 reference (the
        definitions, row chunk by row chunk): fp32 and bf16 logits, N = 8192 tokens,
        V = 151936, every loss type x entropy mode; loss, statistics, gradient (arbitrary
        upstream gradient), input left unmodified. ``fused_linear_eaft_cross_entropy`` against
        the unfused path (output-layer GEMM + the op) in the same dtype, hidden 1024, with
        Megatron's uniform upstream gradient and an arbitrary one. The Triton kernels
        (``impl="triton"``) against the same reference at N = 2048 (fp32 and bf16; on CPU under
        Triton's interpreter, ``TRITON_INTERPRET=1``, at N = 4, V = 160, in fp32 and fp16: the
        interpreter has no bf16 arithmetic). tp = 1 in a world_size=1 NCCL group.
        Tolerances: ``TOLERANCES`` in ``acceptance/common.py``.
speed   ``benchmarks/bench_loss.py`` (N=8192, V=151936, bf16; megatron-core's
        ``vocab_parallel_cross_entropy`` and its torch.compile'd fused variant vs this package)
        and ``benchmarks/bench_fused.py`` (N=8192, hidden 1024/2048/4096, V=151936, bf16) rows,
        interleaved repeats, ``torch.cuda.max_memory_allocated``, achieved bandwidth as a
        fraction of the device's peak; on a GPU also the Triton kernels (``triton_*``) and
        Liger-Kernel's CE (``liger``, when importable). The targets are checks on a GPU
        (PyTorch path: memory <= Megatron's, time full <= 1.00x, topk <= 1.15x Megatron's;
        Triton: topk <= 0.50x, full <= 0.40x Megatron's time, sft no slower than Liger, peak
        <= 2 bytes per logit; fused (impl auto) loss-part memory <= 1/16 and time <= 1.10x
        unfused), information on CPU (where the Triton path is not timed).
models  small random Qwen3 and GLM-4-0414 models made with transformers, saved, converted by
        ``eaft_megatron.convert.hf_to_megatron``, loaded with megatron-core's dist_checkpointing
        into ``build_gpt_model`` (TransformerEngine spec when installed, else local): logits
        against transformers in fp32 (strict) and bf16.
train   ``python -m eaft_megatron.train`` under torchrun on data prepared with
        ``eaft_megatron.data.preprocess``: 1 GPU (NCCL, bf16, TE spec when installed), and
        TP=2 on 2 GPUs when present; exit 0, metrics.jsonl written, losses finite and
        decreasing, checkpoint saved. If a GPU run fails, one diagnostic re-run (its own checks;
        the failure stands) skips megatron-core's ``make`` of its dataset helpers (the wheel
        ships them built, not the Makefile) and, without transformer-engine, turns off the
        fusions that need apex or TE: does the rest of the GPU path work?

Output: one ``PASS``/``FAIL`` line per check (``INFO`` lines are not checks),
``DIR/gpu_acceptance.json`` (rewritten after every stage, and each running stage keeps
``DIR/stages/<stage>.json`` current after every check, so a timeout still leaves results),
``DIR/gpu_acceptance.md`` (tables for the README), logs under ``DIR/logs``. Exit status 0 only
if every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from acceptance.common import PROFILES, TOLERANCES, Stage, kill_group, write_json  # noqa: E402

STAGES = ("loss", "speed", "models", "train")
REPORT = "gpu_acceptance"


# ---------------------------------------------------------------------------------------------
# Worker: runs stages in this process


def run_worker(args) -> int:
    """Run the stages named by ``--worker`` (comma-separated) in this process, one after the
    other; an exception ends only the stage it happens in."""
    P = PROFILES[args.profile]
    out = Path(args.out)
    deadline = float(args.stage_deadline or (time.time() + 3600))
    all_ok = True
    device = None
    for name in args.worker.split(","):
        stage = Stage(name, out, args.tol_scale, Path(args.work))
        t0 = time.perf_counter()
        try:
            if args.inject_failure == name:
                raise RuntimeError("injected failure (--inject-failure)")
            if device is None:
                import torch

                device = torch.device(args.device)
                if device.type == "cuda":
                    torch.cuda.set_device(0)
            if device.type == "cuda":
                stage.info("device_name", torch.cuda.get_device_name(0))
            if name == "loss":
                from acceptance.loss import stage_loss

                stage_loss(stage, device, P)
            elif name == "speed":
                from acceptance.speed import stage_speed

                stage_speed(stage, device, P)
            elif name == "models":
                from acceptance.models import stage_models

                stage_models(stage, device, P)
            elif name == "train":
                from acceptance.train import stage_train

                stage_train(stage, device, P, deadline)
            stage.data["status"] = "done"
        except Exception as e:  # noqa: BLE001 - reported as this stage's failure
            stage.data.update(status="error", error=f"{type(e).__name__}: {str(e)[:600]}",
                              traceback=traceback.format_exc()[-6000:])
            print(f"FAIL {name}/stage: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc()
        stage.data["seconds"] = round(time.perf_counter() - t0, 1)
        stage.save()
        all_ok &= stage.data["status"] == "done" and all(c["ok"] for c in stage.data["checks"])
        if device is not None and device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
    return 0 if all_ok else 1


# ---------------------------------------------------------------------------------------------
# Driver


def _environment(device: str) -> dict:
    """Versions and devices, without touching CUDA in this (driver) process."""
    import importlib.metadata
    import importlib.util

    def version(dist: str, module: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "present (no metadata)" if importlib.util.find_spec(module) else None

    env = dict(python=sys.version.split()[0], executable=sys.executable, host=platform.node(),
               torch=version("torch", "torch"), device=device,
               megatron_core=version("megatron-core", "megatron.core"),
               transformers=version("transformers", "transformers"),
               transformer_engine=version("transformer-engine", "transformer_engine"),
               apex=version("apex", "apex"), eaft_megatron=version("eaft-megatron",
                                                                     "eaft_megatron"))
    commands = dict(git_commit=["git", "rev-parse", "--short", "HEAD"])
    if device == "cuda":
        commands["gpus"] = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"]
    for key, cmd in commands.items():
        try:
            text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            text = ""
        env[key] = (text.splitlines() if key == "gpus" else text) or None
    return env


_ECHO = ("PASS ", "FAIL ", "INFO ", "| ", "|---")


def _run_group(names: list[str], args, out: Path, timeout: float) -> dict[str, dict]:
    """The stages ``names`` in one child process: their PASS/FAIL/INFO lines and tables
    echoed, everything in ``logs/<first stage>.log``; the child (and its process group) is
    killed when it outlives ``timeout``. Returns each stage's result."""
    log = out / "logs" / f"{names[0]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / "stages" / f"{name}.json").unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(names),
           "--out", str(out), "--work", str(args.work), "--device", args.device,
           "--profile", args.profile,
           "--tol-scale", str(args.tol_scale), "--stage-deadline", str(time.time() + timeout)]
    if args.inject_failure:
        cmd += ["--inject-failure", args.inject_failure]
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if args.device == "cpu":  # the Triton path's checks run under Triton's interpreter
        env.setdefault("TRITON_INTERPRET", "1")
    tail: deque[str] = deque(maxlen=40)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", cwd=ROOT, env=env, start_new_session=True)

        def pump():
            for line in proc.stdout:
                f.write(line)
                f.flush()
                tail.append(line.rstrip())
                if line.startswith(_ECHO):
                    print(line.rstrip(), flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            rc = proc.returncode
        reader.join(timeout=10)
    wall = round(time.perf_counter() - t0, 1)
    results = {}
    for name in names:
        path = out / "stages" / f"{name}.json"
        result = json.loads(path.read_text()) if path.is_file() else \
            dict(stage=name, status="not started", checks=[], tables={}, info={})
        result.update(exit_code=rc, log=str(log))
        if len(names) == 1:
            result["seconds"] = wall  # process start-up and imports included
        status = result["status"]
        if status in ("running", "not started"):
            why = f"killed after {timeout:.0f} s (stage timeout / --deadline)" if timed_out \
                else f"worker died (exit code {rc})"
            result.update(status="timeout" if timed_out else "crashed", error=why)
        elif rc != 0 and status == "done" and len(names) == 1 and \
                all(c["ok"] for c in result["checks"]):
            result.update(status="error", error=f"worker exited with {rc}")
        if result["status"] != "done":
            if result["status"] != "error" or result["error"].startswith("worker exited"):
                # (an exception inside the worker was already reported by it)
                print(f"FAIL {name}/stage: {result['error']}", flush=True)
            print(f"  (log: {log}; last lines:)\n    " + "\n    ".join(list(tail)[-12:]),
                  flush=True)
        results[name] = result
    return results


def _stage_ok(result: dict) -> bool:
    return result.get("status") == "done" and all(c["ok"] for c in result.get("checks", []))


def _markdown(report: dict) -> str:
    from bench_loss import markdown_table

    env = report["environment"]
    lines = [f"# GPU acceptance ({report['profile']} profile, {env['device']})", "",
             f"{', '.join(env.get('gpus') or [env['device']])}; Python {env['python']}, torch "
             f"{env['torch']}, megatron-core {env['megatron_core']}, transformers "
             f"{env['transformers']}, transformer-engine {env['transformer_engine'] or 'absent'};"
             f" commit {env.get('git_commit')}.", "",
             "| stage | result | checks passed | seconds |", "|---|---|---|---|"]
    for name, r in report["stages"].items():
        checks = r.get("checks", [])
        verdict = "PASS" if _stage_ok(r) else f"FAIL ({r.get('status', '?')})"
        lines.append(f"| {name} | {verdict} | {sum(c['ok'] for c in checks)}/{len(checks)} | "
                     f"{r.get('seconds')} |")
    tables = {k: v for r in report["stages"].values() for k, v in r.get("tables", {}).items()}
    from bench_fused import HEADER as FUSED_HEADER
    from bench_loss import HEADER as LOSS_HEADER

    headers = dict(loss=LOSS_HEADER, fused=FUSED_HEADER,
                   models=["model", "dtype", "spec", "tokens", "max_abs_logit", "max_err",
                           "mean_err", "hf_bf16_mean_err", "argmax_agree"],
                   train=["run", "gpus", "tp", "spec", "dtype", "iterations", "first_loss",
                          "last_loss", "ms_per_iter", "seconds", "exit"])
    titles = dict(loss="Loss: forward + backward, {dtype} logits, one rank (peak: memory "
                       "added on top of the logits, gradient included)",
                  fused="Fused output layer + loss vs unfused, {dtype}, N = {tokens}, V = "
                        "{vocab} (loss part: peak minus the gradients every path returns)",
                  models="Megatron vs transformers logits (max_err / mean_err: vs transformers "
                         "fp32; hf_bf16_mean_err: transformers bf16 vs its fp32)",
                  train="Trainer (torchrun, python -m eaft_megatron.train)")
    for key, rows in tables.items():
        if rows:
            title = titles[key].format(**{k: rows[0].get(k) for k in ("dtype", "tokens", "vocab")})
            rows = [{h: r.get(h, "") for h in headers[key]} for r in rows]
            lines += ["", f"**{title}**", "", markdown_table(rows, headers[key])]
    failed = [c for r in report["stages"].values() for c in r.get("checks", []) if not c["ok"]]
    failed += [dict(name=f"{n}/stage", detail=r.get("error") or r.get("status"))
               for n, r in report["stages"].items() if r.get("status") != "done"]
    if failed:
        lines += ["", "**Failures**", ""] + [f"- `{c['name']}`: {c['detail']}" for c in failed]
    return "\n".join(lines) + "\n"


def _save_report(out: Path, report: dict) -> None:
    write_json(out / f"{REPORT}.json", report)
    md = out / f"{REPORT}.md"
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(_markdown(report))
    os.replace(tmp, md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (JSON, Markdown, logs)")
    p.add_argument("--only", default=",".join(STAGES),
                   help=f"comma-separated stages to run (default: {','.join(STAGES)})")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every stage on CPU at tiny sizes (CI keeps the script working)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole run (default 560 on GPU, 1200 on CPU)")
    p.add_argument("--work", default=None,
                   help="scratch directory for models, checkpoints and data (default: a new "
                        "temporary directory, removed at the end; --out only gets small files)")
    p.add_argument("--processes", choices=["per-stage", "one"], default=None,
                   help="a process per stage (isolates crashes and hangs; default on GPU) or one "
                        "for all stages (faster start-up; default with --cpu-smoke)")
    p.add_argument("--tol-scale", type=float, default=1.0,
                   help="multiply every numerical tolerance (0: impossible, to see failures)")
    hidden = argparse.SUPPRESS
    p.add_argument("--device", default=None, help=hidden)  # cpu: the GPU code paths on CPU
    p.add_argument("--profile", default=None, choices=sorted(PROFILES), help=hidden)
    p.add_argument("--inject-failure", default=None, choices=STAGES, help=hidden)
    p.add_argument("--worker", default=None, help=hidden)  # stages, comma-separated
    p.add_argument("--stage-deadline", default=None, help=hidden)
    args = p.parse_args(argv)

    if args.worker:
        return run_worker(args)
    args.command = ["benchmarks/gpu_acceptance.py", *(sys.argv[1:] if argv is None else argv)]

    if args.cpu_smoke:
        args.device, args.profile = "cpu", args.profile or "smoke"
    if args.device is None:
        import torch  # (is_available does not create a CUDA context in this process)

        if not torch.cuda.is_available():
            print("gpu_acceptance: no CUDA device found; --cpu-smoke runs the stages on CPU",
                  file=sys.stderr)
            return 2
        args.device = "cuda"
    args.profile = args.profile or ("gpu" if args.device == "cuda" else "small")
    args.processes = args.processes or ("one" if args.cpu_smoke else "per-stage")
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"--only: unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    deadline = time.time() + (args.deadline or (560 if args.device == "cuda" else 1200))
    P = PROFILES[args.profile]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = args.work is None
    args.work = str(Path(args.work).resolve()) if args.work else \
        tempfile.mkdtemp(prefix="gpu_acceptance-")
    try:
        return _drive(args, stages, P, out, deadline)
    finally:
        if scratch:
            shutil.rmtree(args.work, ignore_errors=True)


def _drive(args, stages: list[str], P, out: Path, deadline: float) -> int:
    report = dict(command=args.command, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  profile=P.name, processes=args.processes, work=args.work,
                  environment=_environment(args.device), tolerances=TOLERANCES,
                  tol_scale=args.tol_scale, stages={})
    env = report["environment"]
    print(f"gpu_acceptance: {args.device} ({', '.join(env.get('gpus') or ['no GPU'])}), profile "
          f"{P.name}, torch {env['torch']}, megatron-core {env['megatron_core']}, transformers "
          f"{env['transformers']}, transformer-engine {env['transformer_engine'] or 'absent'}; "
          f"stages {','.join(stages)} -> {out}", flush=True)
    _save_report(out, report)
    t_all = time.perf_counter()
    groups = [[name] for name in stages] if args.processes == "per-stage" else [stages]
    for group in groups:
        left = deadline - time.time()
        budget = min(sum(P.stage_timeout[n] for n in group), left)
        print(f"== {','.join(group)} (up to {budget:.0f} s)", flush=True)
        if left < 20:
            results = {n: dict(stage=n, status="skipped", checks=[], tables={}, info={},
                               error="not run: --deadline reached", seconds=0) for n in group}
            for n in group:
                print(f"FAIL {n}/stage: not run, --deadline reached", flush=True)
        else:
            results = _run_group(group, args, out, timeout=budget)
        for name, result in results.items():
            report["stages"][name] = result
            n_ok = sum(c["ok"] for c in result.get("checks", []))
            print(f"== {name}: {'PASS' if _stage_ok(result) else 'FAIL'} ({n_ok}/"
                  f"{len(result.get('checks', []))} checks, {result.get('seconds')} s)",
                  flush=True)
        _save_report(out, report)
    checks = [c for r in report["stages"].values() for c in r.get("checks", [])]
    bad_stages = [s for s in stages if not _stage_ok(report["stages"][s])]
    ok = not bad_stages
    report["summary"] = dict(ok=ok, checks=len(checks), failed=sum(not c["ok"] for c in checks),
                             failed_stages=bad_stages,
                             seconds=round(time.perf_counter() - t_all, 1))
    _save_report(out, report)
    print(f"{'PASS' if ok else 'FAIL'} gpu_acceptance: {len(checks) - report['summary']['failed']}"
          f"/{len(checks)} checks passed, stages failed: {','.join(bad_stages) or 'none'}; "
          f"{report['summary']['seconds']} s; {out / (REPORT + '.json')}, "
          f"{out / (REPORT + '.md')}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
