"""preprocess under failure, in real processes: killed workers and parents, signals, overlapping
or concurrently written outputs, leftovers of killed runs, progress in logs, one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eaft_megatron.cli import main
from eaft_megatron.data.workers import WorkerDied, WorkerPool

from tests.support.data import write_jsonl
from .test_pipeline import chat, files_in, read_back

CLI = [sys.executable, "-m", "eaft_megatron", "preprocess"]
TOKENIZED = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def temps(directory: Path) -> set[str]:
    return {n for n in files_in(directory) if ".tmp-" in n}


# -- the worker pool on its own ------------------------------------------------------------------


def _square_or_die(item):
    if item == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if item == "bug":
        raise KeyError("no such thing")
    time.sleep(0.05 if item % 3 == 0 else 0)  # uneven durations: results still in order
    return item * item


def test_pool_returns_results_in_order_and_fails_fast_naming_the_item():
    with WorkerPool(_square_or_die, (), workers=3) as pool:
        for i in range(20):
            pool.submit(i, where=f"item {i}")
        assert [pool.next_result() for _ in range(20)] == [i * i for i in range(20)]
        pids = [p.pid for p in pool._procs]
        pool.submit(1, where="item one")
        pool.submit("die", where="the deadly item")
        started = time.monotonic()
        assert pool.next_result() == 1
        with pytest.raises(WorkerDied, match=r"pid \d+\) was killed by SIGKILL .* while "
                                             r"processing the deadly item"):
            pool.next_result()
        assert time.monotonic() - started < 10
    assert not any(alive(pid) for pid in pids)
    with WorkerPool(_square_or_die, (), workers=2) as pool:
        pool.submit("bug", where="the buggy item")
        with pytest.raises(WorkerDied, match=r"(?s)failed on the buggy item:.*KeyError"):
            pool.next_result()


# -- the command, in subprocesses ----------------------------------------------------------------


def test_killed_worker_fails_the_run_within_seconds_naming_the_chunk(tmp_path, tokenizer_dirs):
    rows = [{"messages": chat(i, turns=3)} for i in range(20000)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    proc = subprocess.Popen(CLI + ["--input", str(path), "--tokenizer",
                                   str(tokenizer_dirs["chatml"]), "--output-prefix",
                                   str(tmp_path / "o"), "--seq-length", "256", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: temps(tmp_path) or proc.poll() is not None, "the run to start")
        workers = children(proc.pid)
        assert len(workers) == 2 and proc.poll() is None, workers
        time.sleep(0.5)
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert elapsed < 15, elapsed
    m = re.search(rf"pid {workers[0]}\) was killed by SIGKILL .* while processing "
                  rf"{re.escape(str(path))} lines (\d+)-(\d+)", err)
    assert m, err
    first, last = int(m[1]), int(m[2])
    assert (first - 1) % 256 == 0 and last - first == 255  # a whole chunk of the input
    assert err.strip().splitlines()[-1].startswith("eaft-megatron preprocess: error: worker")
    assert files_in(tmp_path) == {"in.jsonl"}  # temporaries removed
    assert not any(alive(pid) for pid in workers)


def test_killed_parent_leaves_no_workers_and_its_leftovers_are_removed_next_time(
        tmp_path, capsys):
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    prefix = tmp_path / "o"
    proc = subprocess.Popen(CLI + ["--input", str(fifo), "--format", "tokenized",
                                   "--output-prefix", str(prefix), "--seq-length", "16",
                                   "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with open(fifo, "w") as f:  # blocks until the command opens the pipe
            f.write(json.dumps(TOKENIZED) + "\n")
            f.flush()
            wait_until(lambda: temps(tmp_path), "temporary outputs")
            workers = children(proc.pid)
            assert len(workers) == 2
            proc.kill()  # kill -9: no cleanup can run in the parent
            proc.wait(timeout=60)
    finally:
        proc.kill()
    wait_until(lambda: not any(alive(pid) for pid in workers), "the workers to die", timeout=10)
    left = temps(tmp_path)
    assert len(left) == 2 and all(".bin.tmp-" in n and f"-{proc.pid}-" in n for n in left), left

    # the next run of the same prefix removes and reports them, then writes the dataset
    fifo.unlink()
    path = write_jsonl(tmp_path / "in.jsonl", [TOKENIZED] * 5)
    assert main(["preprocess", "--input", str(path), "--format", "tokenized",
                 "--output-prefix", str(prefix), "--seq-length", "16"]) == 0
    err = capsys.readouterr().err
    for name in left:
        assert f"removed {tmp_path / name}, left by an interrupted run (pid {proc.pid})" in err
    assert temps(tmp_path) == set()
    assert len(read_back(prefix)[0]) == 5


def test_live_concurrent_run_is_refused_and_keeps_its_temporaries(tmp_path, capsys):
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    prefix = tmp_path / "o"
    args = ["--input", str(fifo), "--format", "tokenized", "--output-prefix", str(prefix),
            "--seq-length", "16"]
    proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        with open(fifo, "w") as f:
            f.write(json.dumps(TOKENIZED) + "\n")
            f.flush()
            wait_until(lambda: len(temps(tmp_path)) == 2, "temporary outputs")
            before = temps(tmp_path)
            other = write_jsonl(tmp_path / "other.jsonl", [TOKENIZED])
            assert main(["preprocess", "--input", str(other), "--format", "tokenized",
                         "--output-prefix", str(prefix), "--seq-length", "16"]) == 2
            err = capsys.readouterr().err
            assert f"another run (pid {proc.pid}) is writing" in err, err
            assert temps(tmp_path) == before
        out, err = proc.communicate(timeout=60)  # the pipe closed: the first run completes
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert temps(tmp_path) == set() and read_back(prefix)[0] == [TOKENIZED["input_ids"]]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_removes_temporaries_with_a_message(tmp_path, sig):
    """The signal goes to the whole process group, as Ctrl-C, ``timeout`` or Slurm send it: the
    workers leave it to the parent, which cleans up and reports an interruption (not a crash)."""
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(CLI + ["--input", str(fifo), "--format", "tokenized",
                                   "--output-prefix", str(tmp_path / "o"), "--seq-length", "16",
                                   "--workers", "2"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with open(fifo, "w") as f:
            f.write(json.dumps(TOKENIZED) + "\n")
            f.flush()
            wait_until(lambda: len(temps(tmp_path)) == 2, "temporary outputs")
            workers = children(proc.pid)
            assert len(workers) == 2
            os.killpg(proc.pid, sig)
            _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == (f"eaft-megatron preprocess: interrupted "
                                            f"({signal.Signals(sig).name}): temporary files "
                                            "removed, nothing written")
    assert files_in(tmp_path) == {"in.jsonl"}
    assert not any(alive(pid) for pid in workers)


def test_progress_lines_when_not_a_terminal(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [TOKENIZED] * 600)
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        res = subprocess.run(CLI + ["--input", str(path), "--format", "tokenized",
                                    "--output-prefix", str(tmp_path / "o"), "--seq-length", "16"],
                             stdout=f, stderr=subprocess.STDOUT, timeout=120,
                             env={**os.environ, "EAFT_PROGRESS_INTERVAL": "0"})
    text = log.read_text()
    assert res.returncode == 0, text
    lines = [ln for ln in text.splitlines() if ln.startswith("preprocess: ")]
    counts = [re.match(r"preprocess: (\d+) lines/600 lines \(", ln) for ln in lines[:-1]]
    assert [int(m[1]) for m in counts] == [256, 512, 600], lines  # one line per chunk here
    assert all("docs=" in ln and "ETA" in ln for ln in lines[:-1])
    assert re.match(r"preprocess: done 600 lines in \d:\d\d:\d\d .*docs=600", lines[-1]), lines
    assert "\r" not in text and "CUDA" not in text and "Warning" not in text


# -- mistakes: one line, exit 2, nothing written -------------------------------------------------


def _refused(tmp_path, capsys, args, message):
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["preprocess", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eaft-megatron preprocess: error: "), err
    assert message in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_output_prefix_overlapping_an_input_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    path = write_jsonl(data / "in.jsonl", [TOKENIZED])
    (tmp_path / "link.jsonl").symlink_to(path)
    common = ["--format", "tokenized", "--seq-length", "16", "--output-prefix"]
    _refused(tmp_path, capsys, ["--input", path, *common, path],
             f"--output-prefix {path} is the input {path}")
    _refused(tmp_path, capsys, ["--input", path, *common, tmp_path / "link.jsonl"],
             f"--output-prefix {tmp_path / 'link.jsonl'} is the input {path}")  # via a symlink
    _refused(tmp_path, capsys, ["--input", path, *common, path / "out"],
             "is inside the input")
    _refused(tmp_path, capsys, ["--input", path, *common, data], f"contains the input {path}")
    _refused(tmp_path, capsys, ["--input", tmp_path / "link.jsonl", *common, tmp_path],
             "contains the input")
    victim = write_jsonl(data / "o_summary.json", [TOKENIZED])  # an input named like an output
    _refused(tmp_path, capsys, ["--input", victim, *common, data / "o"],
             f"would overwrite the input {victim}")


def test_mistakes_are_one_line_and_exit_2(tmp_path, capsys, tokenizer_dirs):
    good = write_jsonl(tmp_path / "good.jsonl", [TOKENIZED])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TOKENIZED) + "\n\n{not json\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = ["--output-prefix", tmp_path / "o", "--seq-length", "16"]
    cases = [
        (["--input", tmp_path / "missing.jsonl", *out], "no such file"),
        (["--input", tmp_path, *out], "is a directory"),
        (["--input", bad, "--format", "tokenized", *out], f"{bad}:3: invalid JSON"),
        (["--input", good, "--tokenizer", tmp_path / "nope", *out], "does not exist"),
        (["--input", good, "--tokenizer", tmp_path, *out], "cannot load a Hugging Face tokenizer"),
        (["--input", good, "--tokenizer", good, *out], "is neither"),
        (["--input", empty, "--format", "tokenized", *out], "no training example"),
        (["--input", good, "--format", "tokenized", "--output-prefix", blocker / "o",
          "--seq-length", "16"], "cannot create files in"),
        (["--input", good, "--format", "tokenized", "--output-prefix", tmp_path / "o",
          "--seq-length", "1"], "seq_length must be an integer >= 2, got 1"),
    ]
    for args, message in cases:
        _refused(tmp_path, capsys, args, message)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"prompt": "x"}])
    _refused(tmp_path, capsys, ["--input", unknown, "--tokenizer", tokenizer_dirs["chatml"], *out],
             f"{unknown}:1: unknown format: keys 'prompt'")


def test_malformed_line_names_the_real_column(tmp_path, capsys):
    line = json.dumps({"input_ids": list(range(5, 30)), "labels": list(range(5, 30))})
    cut = tmp_path / "cut.jsonl"  # a line cut short: the error is at its end, not "column 1"
    cut.write_text(json.dumps(TOKENIZED) + "\n" + line[:-1] + "\n")
    typo = tmp_path / "typo.jsonl"  # a missing comma at column 91 of a CRLF line
    assert line[88] == ","
    bad = line[:88] + " " + line[89:]  # "24  25": the parser stops at "25", column 91
    typo.write_bytes((bad + "\r\n").encode())
    out = ["--format", "tokenized", "--output-prefix", tmp_path / "o", "--seq-length", "64"]
    _refused(tmp_path, capsys, ["--input", cut, *out],
             f"{cut}:2: invalid JSON: Expecting ',' delimiter at column {len(line)} (end of "
             f"the line: cut short?)")
    _refused(tmp_path, capsys, ["--input", typo, *out],
             f"{typo}:1: invalid JSON: Expecting ',' delimiter at column 91 (pass")


def test_existing_prefix_needs_force_and_is_replaced_atomically(tmp_path, capsys, monkeypatch):
    from eaft_megatron.data import writer as writer_module

    one = write_jsonl(tmp_path / "one.jsonl", [TOKENIZED])
    two = write_jsonl(tmp_path / "two.jsonl", [TOKENIZED, {"input_ids": [9, 10, 11]}])
    prefix = tmp_path / "out" / "d"
    args = ["--format", "tokenized", "--output-prefix", prefix, "--seq-length", "16"]
    assert main(["preprocess", "--input", str(one), *map(str, args)]) == 0
    capsys.readouterr()
    _refused(tmp_path, capsys, ["--input", two, *args],
             f"--output-prefix {prefix} already holds a dataset (d_summary.json, d_tokens.bin, "
             f"...): choose another prefix, or pass --force to replace it")
    (tmp_path / "out" / "d_summary.json").unlink()  # an incomplete dataset is refused too
    _refused(tmp_path, capsys, ["--input", two, *args], "d_tokens.bin, d_tokens.idx, ...")
    assert main(["preprocess", "--input", str(one), *map(str, args), "--force"]) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def dies(self, *a):  # --force: a run failing half-way leaves the old dataset as it was
        raise OSError("disk gone")

    monkeypatch.setattr(writer_module.DatasetWriter, "add_sample", dies)
    assert main(["preprocess", "--input", str(two), *map(str, args), "--force"]) == 1
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert main(["preprocess", "--input", str(two), *map(str, args), "--force"]) == 0
    assert read_back(prefix)[0] == [TOKENIZED["input_ids"], [9, 10, 11]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in before)
