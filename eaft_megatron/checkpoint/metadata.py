"""Read a torch_dist checkpoint's ``.metadata`` without letting it run code.

``.metadata`` is a pickle (torch's ``FileSystemReader.read_metadata`` is a bare
``pickle.load``), so a crafted checkpoint runs arbitrary code in whoever reads it. This module
unpickles it with an allow-list of exactly what torch's distributed-checkpoint ``Metadata``
consists of (enumerated from checkpoints written by this project's converter and trainer, model,
optimizer and RNG state): the dataclasses and enums of ``torch.distributed.checkpoint``
(``metadata``, ``planner``, ``filesystem._StorageInfo``), ``torch.Size``, torch dtypes,
``torch.serialization._get_layout`` (rebuilds ``torch.strided``), and the two empty classes
megatron-core keeps for older checkpoints. Pickle's own opcodes build the builtin containers.
Anything else is refused, naming the file and the global, before it is called.

:func:`validate_checkpoint_metadata` also checks that every data file the metadata refers to is
a plain file name inside the directory, exists, and is long enough; call it before handing a
directory to megatron-core's loader (which unpickles ``.metadata`` itself).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch

from .errors import CheckpointError, UnsafeCheckpointError
from .layout import METADATA_FILE

__all__ = ["checkpoint_tensor_shapes", "parse_checkpoint_metadata", "read_checkpoint_metadata",
           "validate_checkpoint_metadata"]

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "megatron.core.dist_checkpointing.strategies.torch": {"MCoreMetadata", "MCoreSavePlan"},
    "collections": {"OrderedDict"},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.path} refers to {module}.{name}, which a torch_dist checkpoint's metadata "
            f"never contains: refused (unpickling it could run code)")


def read_checkpoint_metadata(iteration_dir: str | os.PathLike):
    """The ``torch.distributed.checkpoint.metadata.Metadata`` of a torch_dist directory, read
    with the allow-list. Raises :class:`CheckpointError` naming the file when it is missing,
    truncated or corrupt, or :class:`UnsafeCheckpointError` when it refers to anything else."""
    path = Path(iteration_dir) / METADATA_FILE
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    return parse_checkpoint_metadata(data, path)


def parse_checkpoint_metadata(data: bytes, path: str | os.PathLike):
    """The ``Metadata`` pickled in ``data`` (the contents of ``path``), read with the
    allow-list; errors as :func:`read_checkpoint_metadata`'s."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        meta = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, and whatever a malformed stream raises
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise CheckpointError(f"{path} does not hold torch_dist checkpoint metadata "
                              f"(found {type(meta).__name__})")
    return meta


def validate_checkpoint_metadata(iteration_dir: str | os.PathLike):
    """Read ``.metadata`` safely (:func:`read_checkpoint_metadata`) and check the data files it
    names: each a plain file name in ``iteration_dir``, present, and long enough for every
    entry stored in it. Returns the metadata; raises :class:`CheckpointError` naming the file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    iteration_dir = Path(iteration_dir)
    meta = read_checkpoint_metadata(iteration_dir)
    path = iteration_dir / METADATA_FILE
    if not isinstance(meta.storage_data, dict):
        raise CheckpointError(f"{path} has no storage index (not a file-system checkpoint)")
    needed: dict[str, int] = {}
    for info in meta.storage_data.values():
        if not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{path}: unexpected storage entry {type(info).__name__}")
        name = info.relative_path
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path} refers to data file {name!r} outside the checkpoint "
                                  f"directory: refused")
        needed[name] = max(needed.get(name, 0), int(info.offset) + int(info.length))
    for name, end in sorted(needed.items()):
        data_file = iteration_dir / name
        if not data_file.is_file():
            raise CheckpointError(f"{data_file} is missing (listed in {path}): the checkpoint "
                                  f"is incomplete")
        if (size := data_file.stat().st_size) < end:
            raise CheckpointError(f"{data_file} is truncated: {size} bytes, {path} needs {end}")
    return meta


def checkpoint_tensor_shapes(iteration_dir: str | os.PathLike
                             ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor stored in a torch_dist checkpoint (read safely)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_checkpoint_metadata(iteration_dir)
    return {k: (tuple(v.size), v.properties.dtype) for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}
