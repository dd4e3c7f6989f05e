"""``--eaft-landscape``: the entropy-probability landscape from the evaluation's own loss pass.

    python -m pytest -q tests/train/test_landscape.py

Inputs: the tiny random Qwen3 of ``tests/support/tiny_models.py`` with a sharpened output layer (so
it is confident) and a word-level tokenizer (``t0``..``t299``) stored with it; conversations
generated greedily by ``transformers`` from that model (every label is the model's own most likely
token) except for PLANTED ones, where two labels at confident positions are swapped for the token
the model finds least likely (generation continues greedily after the swap). They are written over
two JSONL files with blank lines, prepared packed (several conversations per sample).

Proofs, each an evaluation-only run of ``python -m eaft_megatron.train`` under torchrun:
  * the planted conversations rank first in samples.jsonl, with the right input file and line,
    their conflicting positions decoded (label = the swapped token, predicted = the model's
    argmax computed by transformers, context = the text before);
  * the histogram total == the tokens == the supervised tokens of the data (each evaluated once);
  * the conflict quadrant's share == ``confident_conflicts`` in metrics.jsonl (same thresholds)
    and == a float64 computation from transformers' logits;
  * landscape.json is identical at (TP, PP, DP) = (1,1,1), (2,1,1), (1,2,1), (1,1,2);
  * ``eaft-megatron landscape DIR DIR2`` draws the comparison.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.launch import check, run_train, run_module

SEQ = 64
PLANTED = {("a.jsonl", 6), ("b.jsonl", 4), ("b.jsonl", 12)}  # (file, line)
THRESHOLDS = ("--eaft-conflict-entropy", "0.5", "--eaft-conflict-prob", "0.15")
LAYOUTS = {(1, 1, 1): 1, (2, 1, 1): 2, (1, 2, 1): 2, (1, 1, 2): 2}


def _word_tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    fast.save_pretrained(out)


def _build(root: Path) -> dict:
    import transformers

    from eaft_megatron.convert import hf_to_megatron
    from eaft_megatron.data import preprocess

    from tests.support.tiny_models import TRAIN_VOCAB as VOCAB
    from tests.support.tiny_models import build_train_model

    hf = build_train_model(root / "hf_model", seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # a confident model
    model.save_pretrained(hf)
    _word_tokenizer(hf, VOCAB)
    gen = torch.Generator().manual_seed(1)
    files = {"a.jsonl": [], "b.jsonl": []}
    planted = {}
    for name, count in (("a.jsonl", 14), ("b.jsonl", 16)):
        line = 0
        for i in range(count):
            line += 1
            if i % 5 == 2:
                files[name].append("")  # a blank line
                line += 1
            ids = torch.randint(2, VOCAB, (1, 4), generator=gen)
            swaps = []
            plant = (name, line) in PLANTED
            with torch.no_grad():
                while ids.shape[1] < 18:
                    z = model(ids).logits[0, -1].double()
                    top = z.topk(20).values.softmax(-1)
                    h = float(-(top * top.log()).sum() / math.log(20))
                    nxt = int(z.argmax())
                    if plant and len(swaps) < 2 and ids.shape[1] >= 7 and h < 0.3:
                        nxt = int(z[2:].argmin()) + 2  # the model's least likely token
                        swaps.append((ids.shape[1], nxt, int(z.argmax())))
                    ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            assert not plant or len(swaps) == 2, "no confident position to plant a conflict"
            tokens = ids[0].tolist()
            files[name].append(json.dumps({"input_ids": tokens,
                                           "labels": [-100] * 4 + tokens[4:]}))
            if plant:
                planted[(name, line)] = swaps
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n")
    assert set(planted) == PLANTED
    data = root / "data" / "val"
    summary = preprocess([root / "a.jsonl", root / "b.jsonl"], output_prefix=data,
                         seq_length=SEQ, fmt="tokenized", pack=True, progress=False)
    assert summary["sequences"] < summary["documents"] == 30
    ckpt = hf_to_megatron(hf, root / "mcore", tp=1, pp=1, dtype="fp32", progress=False)
    return dict(hf=hf, ckpt=ckpt, data=data, planted=planted, summary=summary)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("landscape")
    built = _build(root)
    built["root"] = root
    return built


def _eval(tiny, out: Path, layout: tuple[int, int, int], *extra: str):
    tp, pp, dp = layout
    sequences = tiny["summary"]["sequences"]
    batch = 2 if dp == 2 else 1
    assert sequences % batch == 0 or dp == 1
    return check(run_train(
        out, "--load", str(tiny["ckpt"]), "--data-path", str(tiny["data"]), "--eval-only",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--micro-batch-size", "1", "--global-batch-size", str(batch),
        "--eval-iters", str(sequences // batch), "--loss-type", "eaft", *THRESHOLDS,
        "--eaft-landscape", str(out / "landscape"), *extra, nproc=tp * pp * dp))


@pytest.fixture(scope="module")
def runs(tiny):
    if tiny["summary"]["sequences"] % 2:
        pytest.skip("odd number of packed samples")  # the fixture's data gives an even count
    return {layout: _eval(tiny, tiny["root"] / f"run_{'_'.join(map(str, layout))}", layout)
            for layout in LAYOUTS}


def _read(run_dir: Path) -> tuple[dict, list[dict]]:
    d = run_dir / "landscape"
    record = json.loads((d / "landscape.json").read_text())
    samples = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]
    return record, samples


def _oracle(tiny) -> dict:
    """float64 from transformers' logits, conversation by conversation."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny["hf"], dtype=torch.float64)
    model.eval()
    tokens = conflicts = 0
    for name in ("a.jsonl", "b.jsonl"):
        for line in (tiny["root"] / name).read_text().splitlines():
            if not line:
                continue
            rec = json.loads(line)
            ids = torch.tensor([rec["input_ids"]])
            with torch.no_grad():
                z = model(ids).logits[0, :-1]
            labels = torch.tensor(rec["labels"][1:])
            sup = labels != -100
            top = z.topk(20, -1).values.softmax(-1)
            h = -(top * top.log()).sum(-1) / math.log(20)
            p = z.softmax(-1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
            tokens += int(sup.sum())
            conflicts += int((sup & (h.clamp(max=1) < 0.5) & (p < 0.15)).sum())
    return dict(tokens=tokens, conflicts=conflicts)


def test_landscape_over_layouts(tiny, runs):
    base_dir = tiny["root"] / "run_1_1_1"
    record, samples = _read(base_dir)
    oracle = _oracle(tiny)
    # every supervised token once, counted in the histogram and the quadrants
    assert record["tokens"] == tiny["summary"]["supervised_tokens"] == oracle["tokens"]
    assert np.asarray(record["counts"]).sum() == record["tokens"]
    assert sum(q["tokens"] for q in record["quadrants"].values()) == record["tokens"]
    assert record["conversations"] == len(samples) == 30
    assert sum(s["supervised_tokens"] for s in samples) == record["tokens"]
    assert record["quadrants"]["confident_conflict"]["tokens"] == oracle["conflicts"]
    assert record["model"] == str(Path(tiny["ckpt"], "hf").resolve())
    assert record["data"] == str(Path(tiny["data"]).resolve()) and record["final"]
    # == metrics.jsonl's confident conflicts at the same thresholds
    valid = runs[(1, 1, 1)].of("valid")[-1]
    assert valid["confident_conflicts"] == pytest.approx(record["confident_conflicts"],
                                                         rel=1e-6, abs=1e-9)
    # the planted conversations first, pointing at their file and line, decoded
    head = samples[:len(PLANTED)]
    assert {(Path(s["file"]).name, s["line"]) for s in head} == PLANTED, head
    assert all(s["confident_conflicts"] >= 2 for s in head)
    assert all(s["confident_conflicts"] < 2 for s in samples[len(PLANTED):])
    assert [s["rank"] for s in samples] == list(range(1, 31))
    for s in head:
        swaps = tiny["planted"][(Path(s["file"]).name, s["line"])]
        found = {(c["position"], c["label"], c["predicted"]) for c in s["conflicts"]}
        assert set(swaps) <= found, (swaps, s["conflicts"])
        for c in s["conflicts"]:
            assert c["label_text"] == f"t{c['label']}"
            assert c["predicted_text"] == f"t{c['predicted']}"
            assert c["context"] == " ".join(f"t{i}" for i in c["context_ids"])
            assert c["p_label"] < 0.15 and c["entropy"] < 0.5
    assert (base_dir / "landscape" / "landscape.png").stat().st_size > 1000
    # identical at every layout
    text = (base_dir / "landscape" / "landscape.json").read_text()
    for layout in LAYOUTS:
        other = tiny["root"] / f"run_{'_'.join(map(str, layout))}" / "landscape"
        assert (other / "landscape.json").read_text() == text, layout
        assert [json.loads(x)["conversation"] for x in
                (other / "samples.jsonl").read_text().splitlines()] == \
            [s["conversation"] for s in samples], layout
        assert "landscape @ 0: confident conflicts" in runs[layout].output


def test_plot_two_landscapes(tiny, runs):
    a, b = (tiny["root"] / f"run_{x}" / "landscape" for x in ("1_1_1", "1_1_2"))
    out = tiny["root"] / "cmp.png"
    proc = run_module("eaft_megatron.cli", "landscape", a, b, "--out", out, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 1000 and "confident conflicts" in proc.stdout
