"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.launch import build_tiny

pytest_plugins = ["tests.support.cpu_accounting"]  # CPU per test, when asked (docs/testing.md)


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> Path:
    """The training tests' tiny Qwen3, its converted checkpoint and prepared data
    (``tests/support/fixtures.py``), built once per session in a child process. Read-only: take
    a copy with ``tests.support.launch.copy_tiny`` to write next to it."""
    root = tmp_path_factory.mktemp("tiny-inputs")
    build_tiny(root)
    return root


# The longest files first (CPU seconds measured in docs/testing.md), the rest in their usual
# order: with two files at a time (pytest-xdist --dist loadfile hands files out in this order),
# a long file started last would keep one worker busy while the other has nothing left to do.
LONGEST_FIRST = (
    "demo/test_demo.py", "convert/test_nproc.py", "train/test_moe_train.py",
    "train/test_new_moe_train.py", "train/test_restart.py", "train/test_qwen3_5_train.py",
    "benchmarks/test_gpu_acceptance.py", "convert/test_safety.py", "train/test_pretrain.py",
    "train/test_hf_start.py", "train/test_landscape.py", "ops/test_triton_eaft.py",
    "models/test_qwen3_5_moe.py", "train/test_lock.py", "examples/test_sft_scripts.py",
    "examples/test_forgetting.py", "models/test_moe.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item):
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return rank.get(path, len(rank))

    items.sort(key=key)  # stable: a file's tests keep their order
