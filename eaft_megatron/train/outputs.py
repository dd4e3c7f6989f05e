"""Every directory the trainer writes into, checked before any work (:func:`check_output_paths`,
run by :func:`.argv.complete_argv`): a path that is a regular file, lies below one, or cannot
be created for lack of permission is refused in one line instead of failing at the first write
(for ``--eaft-landscape``: after the whole training)."""

from __future__ import annotations

import os
from pathlib import Path

from .flags import TrainArgError, flag_value

__all__ = ["OUTPUT_FLAGS", "check_output_paths"]

#: flags naming a directory the trainer (or Megatron-LM for it) creates and writes into
OUTPUT_FLAGS = ("--save", "--log-dir", "--tensorboard-dir", "--wandb-save-dir",
                "--eaft-landscape", "--export-hf")


def _problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a writable directory, or None."""
    if path.exists() and not path.is_dir():
        return "is a regular file, not a directory: give a directory (or remove the file)"
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            return None
        parent = parent.parent
    if not parent.is_dir():
        return f"lies below {parent}, a regular file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be written: no write permission in {parent}"
    return None


def check_output_paths(argv: list[str]) -> None:
    """Each output directory named in ``argv`` (:data:`OUTPUT_FLAGS`) is one or can be made."""
    for flag in OUTPUT_FLAGS:
        value = flag_value(argv, flag)
        if value:
            why = _problem(Path(value))
            if why:
                raise TrainArgError(f"{flag} {value} {why}")
