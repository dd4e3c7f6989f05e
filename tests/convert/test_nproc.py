"""``convert hf-to-megatron / megatron-to-hf --nproc N``: the same result as one process, all
or nothing.

Oracle: the one-process conversion (itself bit-exact to the HF source, test_convert); the
torch_dist checkpoints are compared through torch.distributed.checkpoint's own reader. The
exports are cut into several shards (small ``max_shard_bytes``) so the workers really share
them."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from eaft_megatron.cli import main
from eaft_megatron.convert import hf_to_megatron, megatron_to_hf
from tests.support.tiny_models import build, build_moe


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("nproc")
    build("qwen3")[1].save_pretrained(root / "qwen3")  # tied embedding, fused QKV, GLU fc1
    build_moe("glm4_moe", root / "glm4_moe")  # experts, fp32 expert bias, carried MTP layer
    return {case: hf_to_megatron(root / case, root / f"{case}-mc", progress=False)
            for case in ("qwen3", "glm4_moe")}


# qwen3: one shard, written by both workers; glm4_moe: several shards, some cut between workers
@pytest.mark.parametrize("case,dtype,nproc,shards", [("qwen3", None, 2, 1),
                                                     ("glm4_moe", "bf16", 3, 4)])
def test_nproc_export_is_bit_identical(ckpts, tmp_path, case, dtype, nproc, shards):
    kw = dict(dtype=dtype, progress=False, max_shard_bytes=1 << 30 if shards == 1 else 40_000)
    one = megatron_to_hf(ckpts[case], tmp_path / "one", **kw)
    many = megatron_to_hf(ckpts[case], tmp_path / "many", nproc=nproc, **kw)
    a, b = _tree(one), _tree(many)
    assert sorted(a) == sorted(b)
    shards_written = [n for n in a if n.endswith(".safetensors")]
    assert len(shards_written) == 1 if shards == 1 else len(shards_written) >= shards
    for name in a:  # every shard byte for byte (tensors, order, header), index, config
        assert a[name] == b[name], name
    if shards > 1:
        index = json.loads(a["model.safetensors.index.json"])
        assert sorted(set(index["weight_map"].values())) == sorted(shards_written)
    assert not _leftovers(tmp_path)


def _dcp(iter_dir: Path) -> dict:
    """Every entry of a torch_dist checkpoint, read by torch.distributed.checkpoint itself
    (tensors, and the pickled common state: our own files)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return _load_state_dict_from_keys(checkpoint_id=str(iter_dir),
                                      storage_reader=FileSystemReader(str(iter_dir)))


def _assert_same_checkpoint(one: Path, many: Path) -> None:
    """``many`` (--nproc 2) stores what ``one`` (--nproc 1) does: every tensor (dtype, values),
    the common state, and the same bytes beside the tensor files; both workers wrote data."""
    a, b = _dcp(one / "iter_0000000"), _dcp(many / "iter_0000000")
    assert sorted(a) == sorted(b)
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 8, sorted(a)  # (layer-stacked: one tensor per kind of weight)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:  # iteration, checkpoint_version, args (parallel sizes, padded vocabulary)
            assert value == b[key], key
    # both workers wrote tensors; everything beside the tensor files is the same bytes
    assert {p.name for p in (many / "iter_0000000").glob("*.distcp")} >= {"__0_0.distcp",
                                                                          "__1_0.distcp"}
    ta, tb = _tree(one), _tree(many)
    same = [n for n in ta if not n.endswith((".distcp", ".metadata"))]
    assert sorted(same) == sorted(n for n in tb if not n.endswith((".distcp", ".metadata")))
    assert any(n.startswith("hf/") for n in same) and "eaft_megatron.json" in same
    for name in same:
        assert ta[name] == tb[name], name


def test_nproc_import_is_bit_identical(ckpts, tmp_path):
    # (the GLM-4.5 MoE at --nproc 2 is compared in the kill -9 test's rerun)
    hf_dir = ckpts["qwen3"].parent / "qwen3"
    one = hf_to_megatron(hf_dir, tmp_path / "one", dtype="bf16", progress=False)
    many = hf_to_megatron(hf_dir, tmp_path / "many", dtype="bf16", progress=False, nproc=2)
    _assert_same_checkpoint(one, many)
    assert not _leftovers(tmp_path)


def test_bad_nproc_is_one_line_exit_2(ckpts, tmp_path, capsys):
    hf_dir = ckpts["qwen3"].parent / "qwen3"
    for direction, source in (("megatron-to-hf", ["--megatron", str(ckpts["qwen3"])]),
                              ("hf-to-megatron", ["--hf", str(hf_dir)])):
        for bad in ("0", "-2", "100000"):
            rc = main(["convert", direction, *source, "--out", str(tmp_path / "out"),
                       "--nproc", bad])
            err = capsys.readouterr().err.strip()
            why = (f"--nproc {bad} is more processes than the model has parameter tensors to "
                   f"share (" if bad == "100000" else
                   f"--nproc must be a positive number of processes, got {bad}")
            assert rc == 2 and err.startswith(f"eaft-megatron convert: error: {why}"), err
            assert len(err.splitlines()) == 1, err
            assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("direction", ["megatron-to-hf", "hf-to-megatron"])
def test_kill9_of_a_worker_leaves_nothing_and_no_process(ckpts, tmp_path, direction):
    out = tmp_path / "out"
    source = (["--megatron", str(ckpts["glm4_moe"])] if direction == "megatron-to-hf" else
              ["--hf", str(ckpts["glm4_moe"].parent / "glm4_moe")])
    p = subprocess.Popen([sys.executable, "-m", "eaft_megatron", "convert", direction, *source,
                          "--out", str(out), "--nproc", "2"], stderr=subprocess.PIPE, text=True)
    parent, seen, victim = psutil.Process(p.pid), set(), None
    end = time.monotonic() + 300
    while victim is None and time.monotonic() < end and p.poll() is None:
        with contextlib.suppress(psutil.Error):
            for c in parent.children(recursive=True):
                seen.add(c)
                # worker 1 (the name it gives itself), once connected to the parent's store
                # (the other worker is then joining or inside the collective checkpoint load)
                if c.name() == "eaft-nproc-1" and c.net_connections(kind="tcp"):
                    victim = c
        time.sleep(0.01)
    assert victim is not None, "no worker seen"
    # forked by the forker after its imports (its command line), not a fresh interpreter
    forker = victim.parent()
    assert forker.ppid() == p.pid and victim.cmdline() == forker.cmdline(), victim.cmdline()
    assert "eaft_megatron.convert.parallel" in forker.cmdline()
    victim.kill()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err
    assert "eaft-megatron convert: error: --nproc 2: worker 1 was killed by signal 9" in err, err
    assert not out.exists() and not _leftovers(tmp_path)
    time.sleep(0.5)
    alive = []
    for c in seen:
        with contextlib.suppress(psutil.Error):
            if c.status() != psutil.STATUS_ZOMBIE:
                alive.append(c.cmdline())
                c.kill()
    assert not alive, f"processes outlived the converter: {alive}"
    # and a rerun (a fresh process of the same command) completes
    rerun = subprocess.run([sys.executable, "-m", "eaft_megatron", "convert", direction, *source,
                            "--out", str(out), "--nproc", "2"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    if direction == "hf-to-megatron":  # the same as the one-process conversion
        _assert_same_checkpoint(ckpts["glm4_moe"], out)
    else:
        assert _tree(out) == _tree(megatron_to_hf(ckpts["glm4_moe"], tmp_path / "one",
                                                  progress=False))
    assert not _leftovers(tmp_path)
