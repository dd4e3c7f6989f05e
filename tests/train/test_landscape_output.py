"""``samples.jsonl``'s ranking per evaluated copy and the missing-matplotlib message
(``eaft_megatron.train.landscape_output``), in process: no trainer launch."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np

from eaft_megatron.train.landscape_output import sample_records, write_landscape
from eaft_megatron.train.landscape_stats import ROW


def _merged(rows):
    return dict(rows=np.array(rows, dtype=np.float64).reshape(-1, ROW),
                slots=np.zeros((0, 5)), hist=np.zeros((4, 4), dtype=np.int64),
                quadrants=np.array([3, 2, 1, 4], dtype=np.int64), truncated=False)


def test_a_conversation_evaluated_twice_does_not_outrank_more_real_conflicts(tmp_path):
    # conversation 0: 2 conflicts in 10 tokens, counted 3 times (an evaluation cycling over
    # the data); conversation 1: 4 conflicts in 10 tokens, once
    merged = _merged([[0, 30, 6, 15, 3], [1, 10, 4, 5, 1]])
    out = sample_records(merged, data=str(tmp_path / "none"), hf_dir=str(tmp_path), top=0)
    assert [r["conversation"] for r in out] == [1, 0]
    assert out[1]["confident_conflicts"] == 2 and out[1]["supervised_tokens"] == 10
    assert out[1]["evaluations"] == 3 and "evaluations" not in out[0]
    assert out[1]["conflict_share"] == 0.2 and out[1]["mean_gate_weight"] == 0.5


def test_no_matplotlib_is_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    args = SimpleNamespace(load=None, loss_type="eaft", eaft_top_k=20, eaft_entropy="topk",
                           eaft_conflict_entropy=0.15, eaft_conflict_prob=0.15,
                           eaft_landscape_top=0)
    write_landscape(tmp_path, _merged([[1, 10, 4, 5, 1]]), args=args, hf_dir=str(tmp_path),
                    data=str(tmp_path / "none"), iteration=3, final=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landscape.json", "samples.jsonl"]
    assert json.loads((tmp_path / "landscape.json").read_text())["tokens"] == 10
    said = capsys.readouterr().out
    assert said.startswith(f"eaft_megatron.train: warning: {tmp_path / 'landscape.png'} not "
                           f"drawn: matplotlib is not installed (pip install matplotlib"), said
