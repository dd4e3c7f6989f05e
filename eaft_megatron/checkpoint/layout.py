"""Where things are in a checkpoint directory, as Megatron-LM and this project lay it out::

    <root>/latest_checkpointed_iteration.txt   the tracker: "7" (or "release")
    <root>/iter_0000007/.metadata              torch_dist (dist_checkpointing.save output)
    <root>/hf/config.json                      the HF config (and tokenizer) the model is
                                               described by: stored by the converter and by
                                               the trainer's --save
    <root>/eaft_megatron.json                  the conversion marker (a converted model:
                                               weights only, loaded with --finetune)

Every name and rule about this layout lives here: the tracker, iteration directory names,
when an iteration directory is complete, the stored ``hf/`` directory (which files it holds,
storing it, and the one finder for it). Pure path logic: no torch, no megatron. Errors are
:class:`.errors.CheckpointError`.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import CheckpointError

__all__ = ["CONVERTED_MARK", "HF_DIR", "HF_SIDE_FILES", "METADATA_FILE", "TRACKER",
           "complete_iterations", "copy_side_files", "find_hf_dir", "find_iteration_dir",
           "is_complete", "is_converted", "iteration_dir_name", "latest_complete", "read_tracker",
           "store_hf_dir", "write_tracker"]

TRACKER = "latest_checkpointed_iteration.txt"
METADATA_FILE = ".metadata"  # torch_dist's pickled index of an iteration directory
HF_DIR = "hf"
CONVERTED_MARK = "eaft_megatron.json"  # written by `eaft-megatron convert hf-to-megatron`
# The files of a HF model directory that are not weights: what the stored hf/ directory holds.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    # HF tensors the Megatron model does not hold (GLM-4.5's multi-token-prediction layers),
    # carried through a conversion round trip (convert.EXTRA_TENSORS_FILE).
    "extra_tensors.safetensors",
)
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def iteration_dir_name(iteration: int | str) -> str:
    """``iter_0000007`` (Megatron-LM's name), or ``release``."""
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def is_complete(iteration_dir: str | os.PathLike) -> bool:
    """A finished save: torch_dist's ``.metadata`` (written last), or the legacy torch format's
    rank-0 file."""
    iteration_dir = Path(iteration_dir)
    return (iteration_dir / METADATA_FILE).is_file() or \
        (iteration_dir / "mp_rank_00" / "model_optim_rng.pt").is_file()  # legacy torch format


def is_converted(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a model converted from HF (its marker file is there)."""
    return (Path(root) / CONVERTED_MARK).is_file()


def complete_iterations(root: str | os.PathLike) -> list[int]:
    """Iterations with a complete ``iter_XXXXXXX`` directory under ``root``, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [int(m.group(1)) for p in root.iterdir() if (m := _ITER_DIR.match(p.name))
             and p.is_dir() and is_complete(p)]
    return sorted(found)


def read_tracker(root: str | os.PathLike) -> int | str | None:
    """The iteration the tracker of ``root`` names (``"release"`` as such), None without a
    tracker; a tracker that is not a number raises :class:`CheckpointError`."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return text
    if not text.isdigit():
        raise CheckpointError(f"corrupt {tracker}: {text!r} is not an iteration number")
    return int(text)


def write_tracker(root: str | os.PathLike, iteration: int) -> None:
    """Point the tracker of ``root`` at ``iteration`` (atomically)."""
    from ..paths import atomic_output

    with atomic_output(Path(root) / TRACKER, directory=False, force=True) as tmp:
        tmp.write_text(str(iteration))


def latest_complete(root: str | os.PathLike | None) -> int | None:
    """The iteration the tracker of ``root`` names, when its directory is complete; None when
    ``root`` holds no checkpoint. A tracker naming a missing/incomplete directory, or complete
    iteration directories without a tracker, raise :class:`CheckpointError`."""
    if root is None:
        return None
    root = Path(root)
    tracker = root / TRACKER
    iteration = read_tracker(root)
    if iteration is None:
        orphans = complete_iterations(root)
        if orphans:
            raise CheckpointError(
                f"{root} holds complete checkpoints (iterations {orphans}) but no {TRACKER}: "
                f"restore it (echo {orphans[-1]} > {tracker}) or move the directory away; "
                "starting over would overwrite them")
        return None
    if iteration == "release":
        return 0
    if not is_complete(root / iteration_dir_name(iteration)):
        raise CheckpointError(f"{tracker} names iteration {iteration}, but "
                              f"{root / iteration_dir_name(iteration)} is missing or incomplete")
    return iteration


def find_iteration_dir(root: str | os.PathLike, iteration: int | None = None) -> Path:
    """The torch_dist ``iter_XXXXXXX`` (or ``release``) directory of a checkpoint root: the one
    the tracker names, or ``iteration``; ``root`` may be an iteration directory itself."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"Megatron checkpoint directory {root} does not exist")
    if iteration is None:
        named = read_tracker(root)
        if named is None:
            if (root / METADATA_FILE).is_file():  # pointed at an iteration directory itself
                return root
            raise CheckpointError(
                f"{root} is not a Megatron checkpoint: no {TRACKER} (and no {METADATA_FILE})"
            )
        iteration = named
    path = root / iteration_dir_name(iteration)
    if not (path / METADATA_FILE).is_file():
        raise CheckpointError(f"checkpoint iteration directory {path} is missing or incomplete "
                              f"(no {METADATA_FILE})")
    return path


def copy_side_files(src: Path, dst: Path, names: Iterable[str] = HF_SIDE_FILES) -> list[str]:
    """Copy the config/tokenizer files that exist in ``src`` to ``dst``; return their names."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def store_hf_dir(hf_dir: str | os.PathLike, root: str | os.PathLike,
                 extra: Callable[[Path], None] | None = None) -> Path:
    """``<root>/hf``: the config/tokenizer files of ``hf_dir`` copied there (atomically), unless
    it already holds a ``config.json`` or is ``hf_dir`` itself; returns it. ``extra(tmp)``
    writes more files into the directory before it appears (the carried HF tensors of a run
    that starts from a Hugging Face directory)."""
    from ..paths import atomic_output

    hf_dir, target = Path(hf_dir), Path(root) / HF_DIR
    if (target / "config.json").is_file() or target.resolve() == hf_dir.resolve():
        return target
    with atomic_output(target, force=True) as tmp:
        copy_side_files(hf_dir, tmp)
        if extra is not None:
            extra(tmp)
    return target


def find_hf_dir(*roots: str | os.PathLike | None,
                hf_config: str | os.PathLike | None = None) -> Path | None:
    """The HF config directory describing a checkpoint: ``hf_config`` when given (it must hold
    a ``config.json``: else :class:`CheckpointError` naming ``--hf-config``), else the ``hf/``
    directory stored with the first of ``roots`` that has one (``None`` entries skipped);
    None when none has. Callers word the "not found" error for their command line."""
    if hf_config is not None:
        path = Path(hf_config)
        if not (path / "config.json").is_file():
            why = "no config.json there" if path.is_dir() else \
                ("is not a directory" if path.exists() else "does not exist")
            raise CheckpointError(f"--hf-config {path}: {why}")
        return path
    for root in roots:
        if root is not None and (Path(root) / HF_DIR / "config.json").is_file():
            return Path(root) / HF_DIR
    return None
