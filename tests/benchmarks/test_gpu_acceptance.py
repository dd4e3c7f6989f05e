"""``benchmarks/gpu_acceptance.py`` on CPU: ``--cpu-smoke`` passes every stage, and failures
(an exception in one stage, an impossible tolerance) are reported and give a non-zero exit.

    python -m pytest -q tests/benchmarks/test_gpu_acceptance.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.launch import zygote_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"
STAGES = ("loss", "speed", "models", "train")


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    # the train stage's trainer launch: forked from the session's zygote (EAFT_TORCHRUN)
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1", **zygote_env())
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--cpu-smoke", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _lines(proc: subprocess.CompletedProcess, prefix: str) -> list[str]:
    return [x for x in proc.stdout.splitlines() if x.startswith(prefix)]


def test_cpu_smoke_passes_every_stage(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert _lines(proc, "FAIL ") == []
    passed = _lines(proc, "PASS ")
    for stage in STAGES:
        assert any(x.startswith(f"PASS {stage}/") for x in passed), stage
    assert passed[-1].startswith("PASS gpu_acceptance:")

    report = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert report["summary"]["ok"] is True and report["summary"]["failed"] == 0
    assert report["profile"] == "smoke" and report["environment"]["device"] == "cpu"
    assert list(report["stages"]) == list(STAGES)
    for stage, result in report["stages"].items():
        assert result["status"] == "done" and result["seconds"] > 0, stage
        assert result["checks"] and all(c["ok"] for c in result["checks"]), stage
    checks = {c["name"] for r in report["stages"].values() for c in r["checks"]}
    # every loss type x entropy mode x dtype against the float64 reference, and the fused op
    assert {f"loss/op {d} {t}/{e}" for d in ("fp32", "bf16") for t in ("sft", "dft", "eaft")
            for e in ("topk", "full")} <= checks
    assert "loss/fused bf16 eaft/topk megatron upstream" in checks
    # the Triton kernels under Triton's interpreter (fp32, and fp16 as it has no bf16)
    assert {f"loss/triton fp32 {t}/{e}" for t in ("sft", "dft", "eaft")
            for e in ("topk", "full")} | {"loss/triton fp16 eaft/topk"} <= checks
    assert {f"models/{m} {d} logits vs transformers" for m in ("qwen3", "glm4")
            for d in ("fp32", "bf16")} <= checks
    assert {"train/tp1 exits 0", "train/tp1 loss finite and decreasing"} <= checks
    tables = report["stages"]["speed"]["tables"]
    assert {r["provider"] for r in tables["loss"]} == {"megatron", "sft", "eaft_topk",
                                                        "eaft_full"}
    assert {r["provider"] for r in tables["fused"]} == {"unfused_eaft", "fused_eaft",
                                                         "megatron_ce"}
    train = report["stages"]["train"]["tables"]["train"]
    assert train[0]["last_loss"] < train[0]["first_loss"]

    md = (tmp_path / "gpu_acceptance.md").read_text()
    assert "| stage | result | checks passed | seconds |" in md
    assert "| loss | PASS |" in md and "| train | PASS |" in md
    assert "| qwen3 | bf16 |" in md and "**Failures**" not in md


def test_failures_are_isolated_reported_and_fail_the_run(tmp_path):
    # One process per stage, as on a GPU: the first stage raises at once, the second still
    # runs, with tolerances that no real computation meets.
    proc = _run(tmp_path, "--processes", "per-stage", "--only", "models,loss",
                "--inject-failure", "models", "--tol-scale", "0")
    assert proc.returncode == 1, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert any(x.startswith("FAIL models/stage: RuntimeError: injected failure")
               for x in _lines(proc, "FAIL "))
    assert any(x.startswith("FAIL loss/op ") for x in _lines(proc, "FAIL "))
    assert proc.stdout.splitlines()[-1].startswith("FAIL gpu_acceptance:")

    report = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert report["summary"]["ok"] is False and report["tol_scale"] == 0
    assert list(report["stages"]) == ["models", "loss"]
    assert report["stages"]["models"]["status"] == "error"
    assert "injected failure" in report["stages"]["models"]["error"]
    loss = report["stages"]["loss"]
    assert loss["status"] == "done" and len(loss["checks"]) == 36
    assert any(not c["ok"] for c in loss["checks"])
    md = (tmp_path / "gpu_acceptance.md").read_text()
    assert "**Failures**" in md and "`models/stage`" in md
