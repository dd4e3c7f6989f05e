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
