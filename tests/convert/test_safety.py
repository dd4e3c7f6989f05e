"""Conversion refuses what would destroy or run things, and says so in one line with exit 2.

Through the real command (``eaft_megatron.cli.main`` in-process, or ``python -m eaft_megatron``
in a subprocess where the process itself matters: signals, kill -9, child processes).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from eaft_megatron.checkpoint import UnsafeCheckpointError as UnsafeMetadataError
from eaft_megatron.checkpoint import read_checkpoint_metadata
from eaft_megatron.cli import main
from eaft_megatron.convert import checkpoint_tensor_shapes, hf_to_megatron
from tests.support.launch import run_module
from tests.support.tiny_models import build


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "qwen2"
    build("qwen2")[1].save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory):
    return hf_to_megatron(hf_dir, tmp_path_factory.mktemp("mc") / "ckpt", progress=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _convert(capsys, *argv) -> tuple[int, str]:
    """Run ``eaft-megatron convert ...``; (exit code, the error line)."""
    rc = main(["convert", *map(str, argv)])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("eaft-megatron convert: error: ")]
    return rc, (lines[0] if lines else err)


def _cli(*argv) -> subprocess.CompletedProcess:
    return run_module("eaft_megatron", "convert", *argv, timeout=600)


# ---------------------------------------------------------------------------------------------
# Outputs never overlap inputs


def test_output_overlapping_an_input_is_refused_by_the_real_command(hf_dir, ckpt, tmp_path):
    hf, run = _copy(hf_dir, tmp_path / "hf"), _copy(ckpt, tmp_path / "run")
    os.symlink(run, tmp_path / "run_link")
    before_hf, before_run = _tree(hf), _tree(run)
    cases = [
        (["hf-to-megatron", "--hf", hf, "--out", hf, "--force"], "is the input --hf"),
        (["hf-to-megatron", "--hf", hf, "--out", hf / "mcore"], "is inside the input --hf"),
        (["hf-to-megatron", "--hf", hf, "--out", tmp_path, "--force"], "contains the input --hf"),
        (["megatron-to-hf", "--megatron", run, "--out", tmp_path / "run_link", "--force"],
         "is the input --megatron"),
        (["megatron-to-hf", "--megatron", run / "iter_0000000", "--out", run, "--force"],
         "contains the input --megatron"),
        (["megatron-to-hf", "--megatron", run, "--hf-config", hf, "--out", hf / "x", "--force"],
         "is inside the input --hf-config"),
    ]
    for argv, message in cases:
        r = _cli(*argv)
        assert r.returncode == 2, (argv, r.stderr[-2000:])
        assert "eaft-megatron convert: error: output" in r.stderr and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert _tree(hf) == before_hf and _tree(run) == before_run, argv
    assert not _temps(tmp_path) and not _temps(hf) and not _temps(run)


# ---------------------------------------------------------------------------------------------
# Anticipated mistakes: one line, exit 2, nothing written


def _write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_mistakes_exit_2_with_one_line(hf_dir, ckpt, tmp_path, capsys):
    out = tmp_path / "out"

    def refused(message: str, *argv):
        rc, line = _convert(capsys, *argv, "--out", out)
        assert rc == 2 and message in line, (argv, line)
        assert not out.exists() and not _temps(tmp_path), argv

    refused("HF model directory /nonexistent/model does not exist",
            "hf-to-megatron", "--hf", "/nonexistent/model")
    refused("Megatron checkpoint directory /nonexistent/run does not exist",
            "megatron-to-hf", "--megatron", "/nonexistent/run")

    hf = _copy(hf_dir, tmp_path / "hf")
    refused("tensor parallel size 3 does not divide num_attention_heads=4",
            "hf-to-megatron", "--hf", hf, "--tp", "3")
    refused("pipeline parallel size 3 does not divide num_hidden_layers=2",
            "hf-to-megatron", "--hf", hf, "--pp", "3")

    raw = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**raw, "architectures": ["LlamaForCausalLM"],
                                                "model_type": "llama"}))
    refused("unsupported architecture 'LlamaForCausalLM'", "hf-to-megatron", "--hf", hf)
    (hf / "config.json").write_text(json.dumps(raw))

    tensors = load_file(hf / "model.safetensors")
    good = dict(tensors)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 60)
    save_file(tensors, hf / "model.safetensors")
    refused("HF tensor 'model.layers.0.self_attn.q_proj.weight' has shape (64, 60), expected "
            "(64, 64)", "hf-to-megatron", "--hf", hf)

    _write_raw_safetensors(hf / "model.safetensors",
                           {"model.norm.weight": {"dtype": "F32", "shape": [64]}}, bytes(256))
    refused(f"{hf / 'model.safetensors'}: header entry for tensor 'model.norm.weight' has no "
            f"'data_offsets'", "hf-to-megatron", "--hf", hf)
    _write_raw_safetensors(hf / "model.safetensors", {"model.norm.weight": {
        "dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, bytes(100))
    refused(f"{hf / 'model.safetensors'} is truncated", "hf-to-megatron", "--hf", hf)
    save_file(good, hf / "model.safetensors")

    run = _copy(ckpt, tmp_path / "run")
    distcp = run / "iter_0000000" / "__0_0.distcp"
    distcp.rename(tmp_path / "aside.distcp")
    refused(f"{distcp} is missing (listed in {run / 'iter_0000000' / '.metadata'})",
            "megatron-to-hf", "--megatron", run)
    (tmp_path / "aside.distcp").rename(distcp)

    meta = run / "iter_0000000" / ".metadata"
    whole = meta.read_bytes()
    meta.write_bytes(whole[: len(whole) // 2])
    refused(f"{meta} is truncated or corrupt", "megatron-to-hf", "--megatron", run)
    meta.write_bytes(whole)

    (run / "latest_checkpointed_iteration.txt").write_text("banana")
    refused("corrupt", "megatron-to-hf", "--megatron", run)


# ---------------------------------------------------------------------------------------------
# A checkpoint cannot run code


class _Payload:
    """Unpickling this runs ``touch <marker>`` (as a crafted checkpoint would)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_metadata_pickle_is_refused_and_does_not_run(ckpt, tmp_path, capsys):
    run = _copy(ckpt, tmp_path / "run")
    iter_dir = run / "iter_0000000"
    marker = tmp_path / "pwned"
    crafted = pickle.dumps(_Payload(marker))
    pickle.loads(crafted)  # the oracle: a plain unpickle really runs it
    assert marker.exists()
    marker.unlink()
    (iter_dir / ".metadata").write_bytes(crafted)

    rc, line = _convert(capsys, "megatron-to-hf", "--megatron", run, "--out", tmp_path / "out")
    assert rc == 2 and f"{iter_dir / '.metadata'} refers to posix.system" in line, line
    with pytest.raises(UnsafeMetadataError, match=r"\.metadata refers to posix\.system"):
        checkpoint_tensor_shapes(iter_dir)  # the trainer's vocabulary probe
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_payloads_in_checkpoint_byte_entries_are_never_unpickled(ckpt, tmp_path, capsys):
    """torch's loader unpickles byte entries (common state, _extra_state) with
    weights_only=False; conversion requests tensors only."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    run = _copy(ckpt, tmp_path / "run")
    iter_dir = run / "iter_0000000"
    meta = read_checkpoint_metadata(iter_dir)
    distcp = iter_dir / "__0_0.distcp"
    markers = {}
    for index in list(meta.storage_data):
        if index.fqn.startswith("common_state") or index.fqn.endswith("_extra_state/shard_0_2"):
            markers[index.fqn] = marker = tmp_path / f"pwned_{len(markers)}"
            buf = io.BytesIO()
            torch.save(_Payload(marker), buf)
            offset = distcp.stat().st_size
            with open(distcp, "ab") as f:
                f.write(buf.getvalue())
            meta.storage_data[index] = _StorageInfo(distcp.name, offset, len(buf.getvalue()))
    assert len(markers) >= 2 and "common_state/shard_0_1" in markers
    (iter_dir / ".metadata").write_bytes(pickle.dumps(meta))

    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    with pytest.raises(TypeError):  # the payload's result (an int) is not a state dict
        load_common_state_dict(str(iter_dir))  # the oracle: megatron's own loader runs it
    assert markers.pop("common_state/shard_0_1").exists()

    rc = main(["convert", "megatron-to-hf", "--megatron", str(run), "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    assert not any(m.exists() for m in markers.values())


# ---------------------------------------------------------------------------------------------
# Non-finite weights


def test_non_finite_checkpoint_refused_unless_allowed(hf_dir, tmp_path, capsys):
    hf = _copy(hf_dir, tmp_path / "hf")
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    tensors["model.norm.weight"][7] = float("inf")
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    run = hf_to_megatron(hf, tmp_path / "run", progress=False)
    out = tmp_path / "out"

    rc, line = _convert(capsys, "megatron-to-hf", "--megatron", run, "--out", out)
    assert rc == 2, line
    assert ("non-finite values (NaN/Inf) in 2 tensor(s): decoder.layers.1.mlp.linear_fc2.weight "
            "(nan), decoder.final_layernorm.weight (inf)") in line, line
    assert not out.exists() and not _temps(tmp_path)

    rc = main(["convert", "megatron-to-hf", "--megatron", str(run), "--out", str(out),
               "--allow-non-finite"])
    assert rc == 0
    back = load_file(out / "model-00001-of-00001.safetensors")
    for name, t in tensors.items():
        assert torch.equal(back[name], t) or torch.allclose(back[name], t, equal_nan=True), name
    assert torch.isnan(back["model.layers.1.mlp.down_proj.weight"][3, 5])
    assert torch.isinf(back["model.norm.weight"][7])


# ---------------------------------------------------------------------------------------------
# Interrupted runs: SIGTERM cleans up, kill -9 leaves a leftover the next run removes, and no
# process ever outlives the converter


class _Watch:
    """Start the real command and record every descendant process it ever has."""

    def __init__(self, argv, env=None):
        self.p = subprocess.Popen(
            [sys.executable, "-m", "eaft_megatron", "convert", *map(str, argv)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})})
        self.proc = psutil.Process(self.p.pid)
        self.seen: dict[psutil.Process, str] = {}  # descendant -> its command line

    def poll_until(self, condition, timeout=300.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                for c in self.proc.children(recursive=True):
                    if c not in self.seen:
                        try:
                            self.seen[c] = " ".join(c.cmdline())
                        except psutil.Error:
                            self.seen[c] = "?"
            except psutil.NoSuchProcess:
                pass
            if condition():
                return True
            if self.p.poll() is not None:
                return False
            time.sleep(0.002)
        return False

    def finish(self, timeout=300) -> tuple[int, str]:
        self.poll_until(lambda: False, timeout=timeout)
        _, err = self.p.communicate(timeout=30)
        return self.p.returncode, err

    def check_no_lasting_child(self) -> None:
        """No multiprocessing helper was ever started, and nothing started outlives the run."""
        assert not [cmd for cmd in self.seen.values() if "multiprocessing" in cmd], self.seen
        time.sleep(1.0)
        alive = []
        for c in self.seen:
            with contextlib.suppress(psutil.Error):
                if c.status() != psutil.STATUS_ZOMBIE:
                    alive.append(self.seen[c])
                    c.kill()
        assert not alive, f"processes outlived the converter: {alive}"


def _big_hf(directory: Path) -> Path:
    """A Qwen2 model of ~40 MB: its save takes long enough to be killed in the middle of it."""
    import transformers

    config = transformers.Qwen2Config(
        architectures=["Qwen2ForCausalLM"], vocab_size=16000, hidden_size=256,
        intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def test_sigterm_and_kill9_then_rerun_leave_nothing_and_no_process(tmp_path):
    hf = _big_hf(tmp_path / "hf")
    out = tmp_path / "mcore"
    argv = ["hf-to-megatron", "--hf", hf, "--out", out]

    def tmp_dirs():
        return [p for p in tmp_path.iterdir() if p.name.startswith(".mcore.tmp-")]

    def saving():  # torch_dist is writing the data file
        return any((d / "iter_0000000" / "__0_0.distcp").exists() for d in tmp_dirs())

    # SIGTERM in the middle of the save (torch's checkpointing wraps what its steps raise):
    # the temporary output is removed, with a message, exit 128 + 15.
    w = _Watch(argv)
    assert w.poll_until(saving), w.finish()
    w.p.send_signal(signal.SIGTERM)
    rc, err = w.finish()
    assert rc == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM): removed the unfinished output" in err
    assert "Traceback" not in err and not tmp_dirs() and not out.exists()

    # kill -9 while torch_dist is writing the data file: the temporary stays behind.
    w = _Watch(argv)
    assert w.poll_until(saving), w.finish()
    w.p.kill()
    w.p.wait()
    killed = w.p.pid
    w.check_no_lasting_child()
    left = tmp_dirs()
    assert len(left) == 1 and f"-{killed}-" in left[0].name and not out.exists()

    # The next run removes and reports the leftover, converts, and starts no process either;
    # its progress goes to the log as lines (here one per update: interval 0).
    w = _Watch(argv, env={"EAFT_PROGRESS_INTERVAL": "0"})
    rc, err = w.finish()
    assert "hf -> megatron: 1 tensors/" in err and " tensors/s | elapsed 0:00:" in err, err
    assert "hf -> megatron: done " in err, err
    assert rc == 0, err
    assert f"removed {left[0]}, left by an interrupted run (pid {killed})" in err
    assert not tmp_dirs() and (out / "latest_checkpointed_iteration.txt").read_text() == "0"
    w.check_no_lasting_child()
    if not torch.cuda.is_available():  # no notices about the GPU stack on a CPU machine
        noise = [line for line in err.splitlines() if any(
            word in line for word in ("CUDA", "UserWarning", "FutureWarning", "DEPRECATED"))]
        assert not noise, err
