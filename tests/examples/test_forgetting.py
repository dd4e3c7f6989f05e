"""The forgetting example's --quick mode produces its table (md + CSV) and plot."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

RUN = Path(__file__).resolve().parents[2] / "examples" / "forgetting" / "run.py"


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(RUN), "--quick", *args], capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _read(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(300)
def test_quick_mode_writes_table_and_plot(tmp_path):
    _run("--out", str(tmp_path))

    summary = _read(tmp_path / "summary.csv")
    assert [r["method"] for r in summary] == ["sft", "dft", "eaft"]  # one row per method
    for r in summary:
        for key in ("target_avg", "general_avg", "matched_level"):
            assert 0.0 <= float(r[key]) <= 100.0, (r["method"], key, r[key])
        for key in ("target_std", "general_std"):
            assert float(r[key]) >= 0.0
        for key in ("d_target_vs_sft", "d_general_vs_sft"):
            assert -100.0 <= float(r[key]) <= 100.0
    sft = summary[0]
    assert float(sft["d_general_vs_sft"]) == 0.0 and float(sft["d_target_vs_sft"]) == 0.0
    assert sft["matched_reached"] == "2/2"  # SFT always reaches its own matched level

    by_lr = _read(tmp_path / "by_lr.csv")
    assert sorted((r["method"], float(r["lr"])) for r in by_lr) == sorted(
        (m, lr) for m in ("sft", "dft", "eaft") for lr in (1e-3, 3e-3))  # quick-mode lrs

    runs = _read(tmp_path / "runs.csv")
    assert {r["method"] for r in runs} == {"base", "sft", "dft", "eaft"}
    assert {r["seed"] for r in runs} == {"0", "1"}
    for r in runs:
        for task in ("copy", "reverse", "sort", "shift", "domain", "general"):
            assert 0.0 <= float(r[task]) <= 100.0
    assert all(float(r["w_clean"]) == 1.0 for r in runs if r["method"] == "sft")  # SFT: w = 1
    assert all(0.0 <= float(r["w_noisy"]) <= 1.0 for r in runs if r["method"] in ("dft", "eaft"))

    md = (tmp_path / "summary.md").read_text()
    for text in ("| base |", "| SFT |", "| DFT |", "| EAFT |", "target avg", "general avg"):
        assert text in md

    png = tmp_path / "tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.timeout(300)
def test_rerun_reuses_cached_base(tmp_path):
    first = _run("--seeds", "1", "--out", str(tmp_path))
    assert "seed 0: base pretrained in" in first
    assert len(list((tmp_path / "bases").glob("base_*_seed0.pt"))) == 1
    second = _run("--seeds", "1", "--out", str(tmp_path))
    assert "seed 0: base loaded from cache" in second

    def accuracies(out: str) -> str:
        line = next(line for line in out.splitlines() if line.startswith("seed 0: base"))
        return line.split(": domain")[1]

    assert accuracies(first) == accuracies(second)
