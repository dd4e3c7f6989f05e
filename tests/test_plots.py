"""``eaft-megatron landscape`` mistakes: one line naming the path, exit 2, nothing written (the
pictures themselves are drawn from real trainer output in tests/train/test_landscape.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from eaft_megatron.cli import main
from tests.support.launch import ROOT, subprocess_env


def _refused(capsys, args, message, root):
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert main(["landscape", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err == f"eaft-megatron landscape: error: {message}\n", err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_missing_path_is_named_in_one_line(tmp_path):
    missing = tmp_path / "landscape" / "before"
    res = subprocess.run([sys.executable, "-m", "eaft_megatron", "landscape", str(missing)],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr == (f"eaft-megatron landscape: error: {missing}: no such directory or file "
                          f"(a landscape directory, written by the trainer's --eaft-landscape "
                          f"DIR, or its landscape.json)\n")
    assert "Errno" not in res.stderr and not (tmp_path / "landscape").exists()


def test_other_mistakes(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(capsys, [empty], f"{empty}: no landscape.json in this directory (written by the "
             "trainer's --eaft-landscape DIR, at its evaluations)", tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"bins": 2,')
    _refused(capsys, [broken], f"{broken}: cannot be read as a landscape record (Expecting "
             "property name enclosed in double quotes: line 1 column 12 (char 11))", tmp_path)
    other = tmp_path / "metrics.json"
    other.write_text(json.dumps({"iteration": 3, "loss": 1.0}))
    _refused(capsys, [other], f"{other}: not a landscape record (written by the trainer's "
             "--eaft-landscape DIR): missing bins, counts, thresholds, ...", tmp_path)
    _refused(capsys, [empty, empty, empty], "give one or two landscape directories, got 3",
             tmp_path)
    record = {"bins": 2, "counts": [[1, 0], [0, 1]], "thresholds": {"entropy": .5, "prob": .5},
              "quadrants": {"confident_conflict": {"tokens": 1, "share": 0.5}}, "iteration": 3,
              "tokens": 2, "confident_conflicts": 0.5, "model": "m", "data": "d"}
    (empty / "landscape.json").write_text(json.dumps(record))
    _refused(capsys, [empty, "--out", tmp_path / "no" / "x.png"],
             f"--out {tmp_path / 'no' / 'x.png'}: no directory {tmp_path / 'no'} to write it in",
             tmp_path)
