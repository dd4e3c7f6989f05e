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


def check_output_dir(out: str | os.PathLike, *, force: bool = False) -> Path:
    """Fail early (before any work) if ``out`` may not be written."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConversionError(f"output directory {out} exists and is not empty (use --force)")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out`` only if the block succeeds.

    An existing non-empty ``out`` is an error unless ``force`` (then it is replaced at the very
    end, never before the new content is complete). On failure the temporary directory is
    removed, so a crash or an error leaves no half-written output under ``out``.
    """
    out = check_output_dir(out, force=force)
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


# safetensors dtype names <-> torch dtypes (the format: an 8-byte little-endian header length,
# a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then raw bytes).
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data section) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n > 100 << 20 or n > path.stat().st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ConversionError(f"cannot read {path}: not a valid safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def _bytes_view(t: torch.Tensor):
    """A zero-copy writable/readable byte view of a contiguous CPU tensor."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class SafetensorsReader:
    """Read the tensors of a HF directory (single file or sharded with an index) one at a time.

    Each ``get(name)`` reads that tensor's bytes with ``readinto`` into a fresh tensor: no
    memory map, so the process's resident memory holds only the tensors still referenced
    (an mmap would add every page read to RSS until the file is closed).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / SAFETENSORS_INDEX
        single = self.directory / "model.safetensors"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ConversionError(f"corrupt safetensors index {index}: {e}") from e
        elif single.is_file():
            files = [single.name]
        else:
            found = sorted(p.name for p in self.directory.glob("*"))[:20]
            hint = " (only PyTorch .bin weights: re-save with safe_serialization=True)" if any(
                n.endswith(".bin") for n in found) else ""
            raise ConversionError(
                f"no model.safetensors or {SAFETENSORS_INDEX} in {self.directory}{hint}; "
                f"found: {found}"
            )
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for fname in files:
            path = self.directory / fname
            if not path.is_file():
                raise ConversionError(f"{index} lists {fname}, which is missing")
            header, data_start = _read_header(path)
            size = path.stat().st_size
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                if entry["dtype"] not in _ST_DTYPES:
                    raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype "
                                          f"{entry['dtype']}")
                if data_start + end > size:
                    raise ConversionError(f"{path} is truncated: tensor {name!r} ends at byte "
                                          f"{data_start + end} of {size}")
                self._entries[name] = (path, data_start, entry)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise ConversionError(f"tensor {name!r} not found in {self.directory}")
        path, data_start, entry = self._entries[name]
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]])
        if out.numel() * out.element_size() != end - begin:
            raise ConversionError(f"{path}: tensor {name!r} has {end - begin} bytes for shape "
                                  f"{entry['shape']} {entry['dtype']}")
        with open(path, "rb", buffering=0) as f:
            f.seek(data_start + begin)
            view, done = _bytes_view(out), 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ConversionError(f"{path}: unexpected end of file reading {name!r}")
                done += n
        return out


class ShardedSafetensorsWriter:
    """Write tensors into ``model-0000i-of-0000n.safetensors`` shards + index, streaming.

    At most ``max_shard_bytes`` of tensors are held before a shard is written; each tensor's
    bytes go straight from its memory to the file (no serialised copy of the shard).
    """

    def __init__(self, directory: Path, *, max_shard_bytes: int = 1 << 30, metadata=None):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ConversionError(f"tensor {name!r} written twice")
        if tensor.dtype not in _ST_NAMES:
            raise ConversionError(f"tensor {name!r}: dtype {tensor.dtype} cannot be saved")
        self._seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().cpu().contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for name, t in self._pending.items():
            n = t.numel() * t.element_size()
            header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        path = self.directory / f"shard-{len(self._shards):05d}.safetensors.tmp"
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for t in self._pending.values():
                if t.numel():
                    f.write(_bytes_view(t))
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
