"""File-level helpers for conversion: atomic output directories, streaming safetensors.

Nothing here knows about architectures or Megatron; ``hf.py``/``megatron.py`` combine these
with the tables in :mod:`eaft_megatron.models`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files of a HF model directory that are not weights and travel with a converted checkpoint.
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
)


class ConversionError(ValueError):
    """A checkpoint or model directory that cannot be converted (message says why)."""


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out`` only if the block succeeds.

    An existing non-empty ``out`` is an error unless ``force`` (then it is replaced at the very
    end, never before the new content is complete). On failure the temporary directory is
    removed, so a crash or an error leaves no half-written output under ``out``.
    """
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConversionError(f"output directory {out} exists and is not empty (use --force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(src: Path, dst: Path, names: Iterable[str] = HF_SIDE_FILES) -> list[str]:
    """Copy the config/tokenizer files that exist in ``src`` to ``dst``; return their names."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


class SafetensorsReader:
    """Lazy access to the tensors of a HF directory (single file or sharded with an index).

    Tensors are read one at a time on ``get(name)``; nothing else stays in memory.
    """

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / SAFETENSORS_INDEX
        single = self.directory / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"corrupt safetensors index {index}: {e}") from e
        elif single.is_file():
            weight_map = None
        else:
            found = sorted(p.name for p in self.directory.glob("*"))[:20]
            hint = " (only PyTorch .bin weights: re-save with safe_serialization=True)" if any(
                n.endswith(".bin") for n in found) else ""
            raise ConversionError(
                f"no model.safetensors or {SAFETENSORS_INDEX} in {self.directory}{hint}; "
                f"found: {found}"
            )
        self._files: dict[str, object] = {}
        if weight_map is None:
            handle = self._open(single, safe_open)
            self.weight_map = {k: single.name for k in handle.keys()}
        else:
            self.weight_map = dict(weight_map)
            for fname in sorted(set(self.weight_map.values())):
                path = self.directory / fname
                if not path.is_file():
                    raise ConversionError(f"{index} lists {fname}, which is missing")
                self._open(path, safe_open)
        self._safe_open = safe_open

    def _open(self, path: Path, safe_open):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"cannot read {path}: {e}") from e
        self._files[path.name] = handle
        return handle

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"tensor {name!r} not found in {self.directory}")
        try:
            return self._files[self.weight_map[name]].get_tensor(name)
        except Exception as e:
            raise ConversionError(f"cannot read tensor {name!r} from {self.directory}: {e}") from e


class ShardedSafetensorsWriter:
    """Write tensors one by one into ``model-0000i-of-0000n.safetensors`` shards + index.

    At most ``max_shard_bytes`` of tensors are held before a shard is flushed.
    """

    def __init__(self, directory: Path, *, max_shard_bytes: int = 2 << 30, metadata=None):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise ConversionError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        i = len(self._shards)
        save_file(self._pending, str(self.directory / f"shard-{i:05d}.safetensors.tmp"),
                  metadata=self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / f"shard-{i:05d}.safetensors.tmp", self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
