"""``convert megatron-to-hf --nproc N``: the same files as one process, all or nothing.

Oracle: the one-process export (itself bit-exact to the HF source, test_convert). The exports
are cut into several shards (small ``max_shard_bytes``) so the workers really share them."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

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


@pytest.mark.parametrize("case,dtype,nproc", [("qwen3", None, 2), ("glm4_moe", "bf16", 3)])
def test_nproc_export_is_bit_identical(ckpts, tmp_path, case, dtype, nproc):
    kw = dict(dtype=dtype, progress=False, max_shard_bytes=40_000)
    one = megatron_to_hf(ckpts[case], tmp_path / "one", **kw)
    many = megatron_to_hf(ckpts[case], tmp_path / "many", nproc=nproc, **kw)
    a, b = _tree(one), _tree(many)
    assert sorted(a) == sorted(b)
    shards = [n for n in a if n.endswith(".safetensors")]
    assert len(shards) >= nproc + 1, shards  # several shards: every worker has some
    for name in a:  # every shard byte for byte (tensors, order, header), index, config
        assert a[name] == b[name], name
    index = json.loads(a["model.safetensors.index.json"])
    assert sorted(set(index["weight_map"].values())) == sorted(shards)
    assert not _leftovers(tmp_path)


def test_bad_nproc_is_one_line_exit_2(ckpts, tmp_path, capsys):
    for bad in ("0", "-2"):
        rc = main(["convert", "megatron-to-hf", "--megatron", str(ckpts["qwen3"]),
                   "--out", str(tmp_path / "out"), "--nproc", bad])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err == ("eaft-megatron convert: error: --nproc must be a positive "
                                   f"number of processes, got {bad}"), err
        assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_kill9_of_a_worker_leaves_nothing_and_no_process(ckpts, tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "eaft_megatron", "convert", "megatron-to-hf",
                          "--megatron", str(ckpts["glm4_moe"]), "--out", str(out),
                          "--nproc", "2"], stderr=subprocess.PIPE, text=True)
    parent, seen, victim = psutil.Process(p.pid), set(), None
    end = time.monotonic() + 300
    while victim is None and time.monotonic() < end and p.poll() is None:
        with contextlib.suppress(psutil.Error):
            for c in parent.children(recursive=True):
                seen.add(c)
                # worker 1, once past its imports: connected to the parent's store (the
                # other worker is then joining or inside the collective checkpoint load)
                if "eaft_megatron.convert.parallel" in " ".join(c.cmdline()) and \
                        c.cmdline()[-1] == "1" and c.net_connections(kind="tcp"):
                    victim = c
        time.sleep(0.01)
    assert victim is not None, "no worker seen"
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
