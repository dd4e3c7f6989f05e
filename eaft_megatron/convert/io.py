"""File-level helpers for conversion: streaming safetensors (the HF side files that travel with a
checkpoint are :mod:`eaft_megatron.checkpoint.layout`'s).

Nothing here knows about architectures or Megatron; ``convert.py`` combines these with the
tables in :mod:`eaft_megatron.models`. Output directories (overlap checks, atomic temporaries,
cleanup) are :mod:`eaft_megatron.paths`.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import torch

from ..checkpoint.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"


# A checkpoint or model directory that cannot be converted (message says why): the checkpoint
# package's one error type, under the name the conversion API has always raised.
ConversionError = CheckpointError


# safetensors dtype names <-> torch dtypes (the format: an 8-byte little-endian header length,
# a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then raw bytes).
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


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
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ConversionError(f"cannot read {path}: not a valid safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def _check_entry(path: Path, name: str, entry, data_size: int):
    """(dtype, shape, begin, end) of a header entry, or a ConversionError naming what is wrong."""
    def bad(why: str):
        return ConversionError(f"{path}: header entry for tensor {name!r} {why}")

    if not isinstance(entry, dict):
        raise bad(f"is not an object: {entry!r}"[:200])
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise bad(f"has no {key!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ST_DTYPES:
        raise bad(f"has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has invalid data_offsets {offsets!r}")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if numel * ST_DTYPES[dtype].itemsize != end - begin:
        raise bad(f"has {end - begin} bytes for shape {shape} {dtype}")
    if end > data_size:
        raise ConversionError(f"{path} is truncated: tensor {name!r} ends at byte "
                              f"{end} of the {data_size}-byte data section")
    return ST_DTYPES[dtype], shape, begin, end


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A zero-copy writable byte view of a contiguous CPU tensor's memory (it keeps ``t``
    alive). Not through ``.numpy()``, which would make the tensor's storage non-resizable."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    buffer = (ctypes.c_char * n).from_address(t.data_ptr())
    buffer.tensor = t
    return memoryview(buffer).cast("B")


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
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise ConversionError(f"corrupt safetensors index {index}: {e}") from e
            if any(not isinstance(f, str) or Path(f).name != f for f in files):
                raise ConversionError(f"{index} lists a file outside {self.directory}: refused")
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
                self._entries[name] = (path, data_start, _check_entry(path, name, entry,
                                                                      size - data_start))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def _entry(self, name: str):
        if name not in self._entries:
            raise ConversionError(f"tensor {name!r} not found in {self.directory}")
        return self._entries[name]

    def meta(self, name: str) -> torch.Tensor:
        """A tensor of ``name``'s shape and dtype on the meta device (no data)."""
        _, _, (dtype, shape, _, _) = self._entry(name)
        return torch.empty(shape, dtype=dtype, device="meta")

    def get(self, name: str) -> torch.Tensor:
        _, _, (dtype, shape, _, _) = self._entry(name)
        return self.read_into(name, torch.empty(shape, dtype=dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read ``name`` into ``out`` (contiguous, CPU, same shape and dtype); return ``out``."""
        path, data_start, (dtype, shape, begin, _) = self._entry(name)
        if list(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"cannot read {name!r} ({shape} {dtype}) into {tuple(out.shape)} "
                             f"{out.dtype}")
        return self._read_at(path, data_start + begin, out, name)

    def read_rows(self, name: str, start: int, stop: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of ``name`` (its first dimension), reading only their bytes;
        into ``out`` when given (contiguous, CPU, that shape and dtype)."""
        path, data_start, (dtype, shape, begin, _) = self._entry(name)
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"cannot read rows {start}:{stop} of {name!r} {shape}")
        if out is None:
            out = torch.empty([stop - start, *shape[1:]], dtype=dtype)
        elif (list(out.shape) != [stop - start, *shape[1:]] or out.dtype != dtype
              or not out.is_contiguous() or out.device.type != "cpu"):
            raise ValueError(f"cannot read rows {start}:{stop} of {name!r} ({shape} {dtype}) "
                             f"into {tuple(out.shape)} {out.dtype}")
        row_bytes = out[0].numel() * out.element_size() if len(out) else 0
        return self._read_at(path, data_start + begin + start * row_bytes, out, name)

    @staticmethod
    def _read_at(path: Path, offset: int, out: torch.Tensor, name: str) -> torch.Tensor:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            view, done = _bytes_view(out), 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ConversionError(f"{path}: unexpected end of file reading {name!r}")
                done += n
        return out


def shard_file_name(i: int, n: int) -> str:
    """The name of shard ``i`` (from 0) of ``n`` in a sharded HF checkpoint."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def safetensors_header(entries: list[tuple[str, torch.dtype, list[int]]],
                       metadata: dict) -> tuple[bytes, list[int]]:
    """The bytes before the data of a safetensors file holding ``entries`` (name, dtype, shape)
    in this order, and each tensor's byte offset in the file."""
    header: dict = {"__metadata__": metadata}
    offset, offsets = 0, []
    for name, dtype, shape in entries:
        numel = 1
        for d in shape:
            numel *= d
        n = numel * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offsets.append(offset)
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    prefix = len(raw).to_bytes(8, "little") + raw
    return prefix, [len(prefix) + o for o in offsets]


def write_at(fd: int, data: torch.Tensor | bytes, position: int) -> None:
    """Write ``data`` (bytes, or a contiguous CPU tensor's memory) at ``position`` of the open
    file ``fd``."""
    view = _bytes_view(data) if isinstance(data, torch.Tensor) else memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], position + done)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """One safetensors file of ``tensors`` (in this order), each tensor's bytes written straight
    from its memory."""
    prefix, _ = safetensors_header([(n, t.dtype, list(t.shape)) for n, t in tensors.items()],
                                   metadata)
    with open(path, "wb") as f:
        f.write(prefix)
        for t in tensors.values():
            if t.numel():
                f.write(_bytes_view(t))


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
        write_safetensors(self.directory / f"shard-{len(self._shards):05d}.safetensors.tmp",
                          self._pending, self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = shard_file_name(i, n)
            os.replace(self.directory / f"shard-{i:05d}.safetensors.tmp", self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
