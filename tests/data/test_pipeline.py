"""End to end: JSONL -> preprocess -> files read back with megatron-core's own IndexedDataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from eaft_megatron.cli import main
from eaft_megatron.data import PreprocessError, load_summary, preprocess
from eaft_megatron.data import pipeline as pipeline_module
from eaft_megatron.data import writer as writer_module

from tests.support.data import chatml_oracle, write_jsonl

REPO = Path(__file__).resolve().parents[2]
WORDS = "hello world the quick brown fox jumps over a lazy dog cats birds".split()


def chat(i: int, turns: int = 1) -> list[dict]:
    """A deterministic conversation whose length varies with ``i``."""
    messages = [{"role": "system", "content": "you are helpful"}] if i % 3 == 0 else []
    for t in range(turns):
        n = 1 + (i * 7 + t * 3) % 9
        user = " ".join(WORDS[(i + k) % 12] for k in range(n))
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant",
                         "content": " ".join(WORDS[(i * 5 + k) % 12] for k in range(1 + n // 2))})
    return messages


def read_back(prefix) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
    """Per-conversation ids and masks, and the document (sample) boundaries."""
    tokens = IndexedDataset(f"{prefix}_tokens")
    masks = IndexedDataset(f"{prefix}_loss_mask")
    assert masks.index.dtype == np.uint8
    ids = [tokens[i].tolist() for i in range(len(tokens))]
    mask = [masks[i].tolist() for i in range(len(masks))]
    assert [len(a) for a in ids] == [len(m) for m in mask]
    np.testing.assert_array_equal(tokens.document_indices, masks.document_indices)
    return ids, mask, np.array(tokens.document_indices)  # a copy: the index mmap closes with it


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_round_trip_every_format_through_megatron_reader(tmp_path, tokenizer_dirs, chatml_bpe):
    eos = chatml_bpe.token_to_id("<|im_end|>")
    multi = chat(1, turns=3)
    rows = [
        {"messages": multi},
        {"conversations": [{"from": {"user": "human", "assistant": "gpt", "system": "system"}[
            m["role"]], "value": m["content"]} for m in chat(2, turns=2)]},
        {"instruction": "what is", "input": "a fox", "output": "a quick dog"},
        {"text": "the lazy dog"},
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
    ]
    expected = [
        chatml_oracle(chatml_bpe, multi),
        chatml_oracle(chatml_bpe, chat(2, turns=2)),
        chatml_oracle(chatml_bpe, [{"role": "user", "content": "what is\n\na fox"},
                                   {"role": "assistant", "content": "a quick dog"}]),
        (chatml_bpe.encode("the lazy dog").ids + [eos],
         [0] + [1] * len(chatml_bpe.encode("the lazy dog").ids)),
        ([5, 6, 7, 8], [0, 0, 1, 1]),
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    prefix = tmp_path / "out" / "mixed"
    assert main(["preprocess", "--input", str(path), "--tokenizer", str(tokenizer_dirs["chatml"]),
                 "--output-prefix", str(prefix), "--seq-length", "512"]) == 0
    ids, mask, docs = read_back(prefix)
    assert list(zip(ids, mask)) == expected
    assert docs.tolist() == [0, 1, 2, 3, 4, 5]  # unpacked: one sample per conversation
    assert IndexedDataset(f"{prefix}_tokens").index.dtype == np.uint16  # vocabulary < 65500
    summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    assert summary == load_summary(str(prefix))
    assert summary["formats"] == {"messages": 1, "sharegpt": 1, "alpaca": 1, "text": 1,
                                  "tokenized": 1}
    assert (summary["documents"], summary["sequences"], summary["records"]) == (5, 5, 5)
    assert summary["tokens"] == sum(len(e[0]) for e in expected)
    assert summary["supervised_tokens"] == sum(sum(e[1]) for e in expected)
    assert (summary["truncated"], summary["dropped_overlong"], summary["skipped"]) == (0, 0, 0)
    assert summary["pad_id"] == chatml_bpe.token_to_id("<|endoftext|>")
    assert files_in(prefix.parent) == {"mixed_tokens.bin", "mixed_tokens.idx",
                                       "mixed_loss_mask.bin", "mixed_loss_mask.idx",
                                       "mixed_summary.json", "mixed_provenance.npy"}


def test_sentencepiece_and_tokenized_without_tokenizer(tmp_path, tokenizer_dirs):
    rows = [{"messages": chat(i)} for i in range(3)]
    sp_prefix = tmp_path / "sp"
    preprocess([write_jsonl(tmp_path / "a.jsonl", rows)], tokenizer=tokenizer_dirs["sp"],
               output_prefix=sp_prefix, seq_length=256, progress=False)
    ids, mask, _ = read_back(sp_prefix)
    assert len(ids) == 3 and all(m[-1] == 1 and a[-1] == 2 for a, m in zip(ids, mask))  # EOS
    tok_rows = [{"input_ids": a, "labels": [x if k else -100 for x, k in zip(a, m)]}
                for a, m in zip(ids, mask)]
    tok_prefix = tmp_path / "tok"
    summary = preprocess([write_jsonl(tmp_path / "t.jsonl", tok_rows)], fmt="tokenized",
                         output_prefix=tok_prefix, seq_length=256, progress=False)
    assert read_back(tok_prefix)[:2] == (ids, mask)
    assert summary["tokenizer"] is None and summary["token_dtype"] == "int32"


def test_packing_boundaries(tmp_path, tokenizer_dirs, chatml_bpe):
    convs = [chat(i, turns=1 + i % 2) for i in range(40)]
    expected = [chatml_oracle(chatml_bpe, c) for c in convs]
    seq = 96
    assert max(len(e[0]) for e in expected) <= seq
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs])
    summary = preprocess([path], tokenizer=tokenizer_dirs["chatml"], output_prefix=tmp_path / "p",
                         seq_length=seq, pack=True, progress=False)
    ids, mask, docs = read_back(tmp_path / "p")
    # every conversation is stored whole, exactly once
    assert sorted(zip(map(tuple, ids), map(tuple, mask))) == sorted(
        (tuple(a), tuple(m)) for a, m in expected)
    pack_lengths = [sum(len(ids[k]) for k in range(a, b)) for a, b in zip(docs[:-1], docs[1:])]
    assert all(0 < n <= seq for n in pack_lengths)
    assert len(pack_lengths) == summary["sequences"] < summary["documents"] == 40
    assert summary["tokens"] == sum(pack_lengths)
    assert summary["pack_fill"] == round(sum(pack_lengths) / (len(pack_lengths) * seq), 4)
    # first-fit: no two packs could have been merged into one
    assert all(a + b > seq for i, a in enumerate(pack_lengths) for b in pack_lengths[i + 1:])


def test_overlong_truncate_or_drop(tmp_path, tokenizer_dirs, chatml_bpe):
    long_reply = [{"role": "user", "content": "hello"},
                  {"role": "assistant", "content": " ".join(WORDS * 4)}]
    long_prompt = [{"role": "user", "content": " ".join(WORDS * 4)},
                   {"role": "assistant", "content": "ok"}]
    short = chat(0)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in
                                             (long_reply, long_prompt, short)])
    seq = 40
    assert len(chatml_oracle(chatml_bpe, long_prompt)[0]) > seq
    cut = preprocess([path], tokenizer=tokenizer_dirs["chatml"], output_prefix=tmp_path / "cut",
                     seq_length=seq, overlong="truncate", progress=False)
    ids, mask, _ = read_back(tmp_path / "cut")
    full_ids, full_mask = chatml_oracle(chatml_bpe, long_reply)
    assert (ids[0], mask[0]) == (full_ids[:seq], full_mask[:seq])
    assert ids[1] == chatml_oracle(chatml_bpe, short)[0]
    # the long prompt leaves nothing supervised once cut: dropped, not truncated
    assert (cut["truncated"], cut["dropped_overlong"], cut["documents"]) == (1, 1, 2)
    drop = preprocess([path], tokenizer=tokenizer_dirs["chatml"], output_prefix=tmp_path / "drop",
                      seq_length=seq, overlong="drop", progress=False)
    assert (drop["truncated"], drop["dropped_overlong"], drop["documents"]) == (0, 2, 1)
    assert read_back(tmp_path / "drop")[0] == [ids[1]]


GOOD = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ok"}]}
BAD_LINES = [
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "a line must hold a JSON object, got list"),
    ('{"prompt": "x", "completion": "y"}', "unknown format: keys 'prompt', 'completion'"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "ok"}]},
     "messages[0] has no 'role'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "ok"}]},
     "messages[0] (user) has no 'content'"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0] has unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "empty assistant turn"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "ok"}]},
     "messages[0].content must be a string, got int"),
    ({"messages": {"role": "user"}}, "'messages' must be a non-empty list of objects, got dict"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no supervised token"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown 'from' 'robot'"),
    ({"conversations": [{"from": "human"}]}, "conversations[0] (human) has no 'value'"),
    ({"instruction": "x"}, "alpaca record has no 'output'"),
    ({"instruction": "x", "output": ""}, "empty assistant turn"),
    ({"text": 3}, "'text' must be a string, got int"),
    ({"text": " "}, "no supervised token"),
    ({"input_ids": [1, 5], "labels": [-100, 9]}, "labels[1] = 9 but input_ids[1] = 5"),
    ({"input_ids": [1, 5], "labels": [-100, -100]}, "no supervised token"),
    ({"input_ids": ["a", 5]}, "input_ids[0] must be an integer, got str"),
    ({"input_ids": [1, 10**6]}, "input_ids[1] = 1000000 is outside the tokenizer's vocabulary"),
    ({"messages": [{"role": "user", "content": "a <|im_start|> b"},
                   {"role": "assistant", "content": "ok"}]}, "contains the special token"),
    (b'{"text": "\xff"}', "invalid UTF-8"),
]


@pytest.mark.parametrize("bad, reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_line_names_file_line_and_reason(tmp_path, tokenizer_dirs, bad, reason):
    path = tmp_path / "in.jsonl"
    bad = bad if isinstance(bad, bytes) else (
        bad if isinstance(bad, str) else json.dumps(bad)).encode()
    # line 1 good, line 2 blank, line 3 good, line 4 bad
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode(), b"", json.dumps(GOOD).encode(),
                                 bad, json.dumps(GOOD).encode()]) + b"\n")
    with pytest.raises(PreprocessError) as e:
        preprocess([path], tokenizer=tokenizer_dirs["chatml"], output_prefix=tmp_path / "o",
                   seq_length=64, progress=False)
    assert str(e.value).startswith(f"{path}:4: ")
    assert reason in str(e.value)
    assert files_in(tmp_path) == {"in.jsonl"}  # nothing written, no temporary left


def test_cli_reports_error_and_forced_format(tmp_path, tokenizer_dirs, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, GOOD])
    args = ["preprocess", "--input", str(path), "--tokenizer", str(tokenizer_dirs["chatml"]),
            "--output-prefix", str(tmp_path / "o"), "--seq-length", "64", "--format", "alpaca"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{path}:1: alpaca record has no 'instruction'" in err and "--skip-invalid" in err
    assert main(args[:-2] + ["--workers", "0"]) == 2
    assert "workers must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o"),
                 "--seq-length", "64", "--format", "messages"]) == 2
    assert "--format messages needs --tokenizer" in capsys.readouterr().err


def test_skip_invalid_counts_and_keeps_the_rest(tmp_path, tokenizer_dirs):
    good = [{"messages": chat(i)} for i in range(6)]
    bad = [b for b, _ in BAD_LINES[:6]]
    mixed = [row for pair in zip(good, bad) for row in pair]
    mixed_path = write_jsonl(tmp_path / "mixed.jsonl", mixed)
    kw = dict(tokenizer=tokenizer_dirs["chatml"], seq_length=64, progress=False)
    summary = preprocess([mixed_path], output_prefix=tmp_path / "m", skip_invalid=True, **kw)
    assert (summary["skipped"], summary["documents"], summary["records"]) == (6, 6, 12)
    assert summary["skipped_reasons"] == {
        "invalid JSON": 1, "a line must hold a JSON object, got list ([1, 2])": 1,
        "unknown format": 1, "messages[0] has no 'role'": 1,
        "messages[0] (user) has no 'content'": 1,
        "messages[0] has unknown role 'bot'; expected one of system, user, assistant, tool": 1}
    assert summary["skipped_examples"][0].startswith(f"{mixed_path}:2: invalid JSON")
    preprocess([write_jsonl(tmp_path / "good.jsonl", good)], output_prefix=tmp_path / "g", **kw)
    (m_ids, m_mask, m_docs), (g_ids, g_mask, g_docs) = read_back(tmp_path / "m"), read_back(
        tmp_path / "g")
    assert (m_ids, m_mask, m_docs.tolist()) == (g_ids, g_mask, g_docs.tolist())


def test_workers_give_identical_files(tmp_path, tokenizer_dirs, monkeypatch):
    monkeypatch.setattr(pipeline_module, "CHUNK_LINES", 16)  # many chunks in flight
    rows = [{"messages": chat(i, turns=1 + i % 3)} if i % 17 else '{"broken' for i in range(150)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    kw = dict(tokenizer=tokenizer_dirs["qwen3"], seq_length=128, pack=True, skip_invalid=True,
              progress=False)
    one = preprocess([path, path], output_prefix=tmp_path / "w1", workers=1, **kw)
    two = preprocess([path, path], output_prefix=tmp_path / "w2", workers=2, **kw)
    assert two["skipped"] == one["skipped"] == 2 * 9
    for name in ("_tokens.bin", "_tokens.idx", "_loss_mask.bin", "_loss_mask.idx"):
        assert (tmp_path / f"w1{name}").read_bytes() == (tmp_path / f"w2{name}").read_bytes()


def test_atomic_output(tmp_path, tokenizer_dirs, monkeypatch):
    kw = dict(tokenizer=tokenizer_dirs["chatml"], seq_length=64, progress=False)
    path = write_jsonl(tmp_path / "in.jsonl", [{"messages": chat(i)} for i in range(20)])
    prefix = tmp_path / "out"
    preprocess([path], output_prefix=prefix, **kw)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    # 1. interrupted while writing: the old complete dataset is untouched, no temporary left
    calls = {"n": 0}
    real_add = writer_module.DatasetWriter.add_sample

    def interrupted(self, *a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_add(self, *a)

    monkeypatch.setattr(writer_module.DatasetWriter, "add_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess([path], output_prefix=prefix, force=True, **kw)
    monkeypatch.setattr(writer_module.DatasetWriter, "add_sample", real_add)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    # 2. killed half-way through the renames: no summary, so no complete-looking dataset
    renames = {"n": 0}
    real_replace = os.replace

    def dies(src, dst):
        renames["n"] += 1
        if renames["n"] == 3:
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(writer_module.os, "replace", dies)
    with pytest.raises(OSError, match="killed"):
        preprocess([path], output_prefix=prefix, seq_length=32, tokenizer=kw["tokenizer"],
                   force=True, progress=False)
    monkeypatch.setattr(writer_module.os, "replace", real_replace)
    assert not (tmp_path / "out_summary.json").exists()
    assert not any(".tmp-" in name for name in files_in(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a complete prepared dataset"):
        load_summary(str(prefix))


def test_tools_script_help():
    res = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--output-prefix OUT" in res.stdout and "--skip-invalid" in res.stdout


def test_cli_cleans_up_when_terminated(tmp_path, tokenizer_dirs):
    """SIGTERM while the input (a pipe) is still being read: nothing is left behind."""
    import signal
    import time

    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "eaft_megatron", "preprocess", "--input", str(fifo),
         "--tokenizer", str(tokenizer_dirs["chatml"]), "--output-prefix", str(tmp_path / "o"),
         "--seq-length", "64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with open(fifo, "w") as f:  # blocks until the command opens the pipe
            f.write((json.dumps(GOOD) + "\n") * 1000)
            f.flush()
            deadline = time.monotonic() + 60
            while not any(".tmp-" in n for n in files_in(tmp_path)):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    assert files_in(tmp_path) == {"in.jsonl"}


def test_cli_interrupt_message(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_module, "preprocess", interrupted)
    assert main(["preprocess", "--input", "x", "--output-prefix", "o", "--seq-length", "8"]) == 130
    err = capsys.readouterr().err
    assert "interrupted (SIGINT): temporary files removed, nothing written" in err


@pytest.mark.parametrize("pack", [False, True])
def test_provenance_points_back_to_file_and_line(tmp_path, pack):
    """Every prepared conversation (packed or not, skipped lines and blank lines around) maps
    back to the input file and line whose tokens it holds; the dataset's samples name their
    first conversation."""
    from eaft_megatron.data import SFTIndexedDataset, load_provenance

    rng = np.random.default_rng(3)
    sources = {}
    for name in ("a.jsonl", "b.jsonl"):
        lines = []
        for i in range(40):
            if i % 7 == 3:
                lines.append("")  # blank: skipped, still counted as a line
            elif i % 11 == 5:
                lines.append('{"bad": 1}')  # invalid: skipped with --skip-invalid
            else:
                ids = [int(x) for x in rng.integers(1, 500, int(rng.integers(3, 30)))]
                lines.append(json.dumps({"input_ids": ids, "labels": ids}))
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        sources[str((tmp_path / name).resolve())] = lines
    prefix = tmp_path / "out" / "p"
    summary = preprocess([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], output_prefix=prefix,
                         seq_length=64, fmt="tokenized", pack=pack, skip_invalid=True,
                         progress=False)
    assert summary["provenance"]["file"] == "p_provenance.npy"
    prov = load_provenance(str(prefix))
    ids, _, docs = read_back(prefix)
    assert prov.origins.shape == (len(ids), 2) and np.array_equal(prov.document_indices, docs)
    seen = set()
    for conversation, tokens in enumerate(ids):
        path, line = prov.where(conversation)
        assert json.loads(sources[path][line - 1])["input_ids"] == tokens
        seen.add((path, line))
    assert len(seen) == summary["documents"] == len(ids)
    if pack:
        assert summary["sequences"] < summary["documents"]
    ds = SFTIndexedDataset(prefix, shuffle=False)
    for i in range(len(ds)):
        sample = ds[i]
        assert int(sample["sample_index"]) == i
        assert int(sample["first_conversation"]) == prov.conversations_of(i)[0]
