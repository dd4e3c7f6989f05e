"""Loading Megatron checkpoints without unpickling anything freely.

What megatron-core 0.19.2's torch_dist loader unpickles (read in ``torch/distributed/checkpoint``
and ``megatron/core/dist_checkpointing``); tensors themselves are already read with
``weights_only=True``:

- ``.metadata``: ``FileSystemReader.read_metadata`` is a bare ``pickle.load``;
- every byte entry -- ``common_state`` (Megatron's args ``Namespace``, iteration, optimizer step
  and param groups, scheduler), ``rerun_state_machine_state``, ``rng_state`` (Python, numpy,
  torch RNG states), ``optimizer.distributed.*`` (distributed optimizer), each module's
  ``_extra_state``: ``FileSystemReader.read_data`` hands it to ``planner.load_bytes``, which in
  ``DefaultLoadPlanner`` (megatron's ``MCoreLoadPlanner`` inherits it) is
  ``torch.load(..., weights_only=False)``;
- a ``common.pt`` next to them (older torch_dist checkpoints): ``serialization.load_common``.

Two layers; the trainer uses both unless ``--eaft-trust-checkpoint``:

1. :func:`check_checkpoint_entries`, before anything starts: the globals of every byte entry
   (and of ``common.pt``) are listed statically, with torch's own disassembler of a
   ``torch.save`` pickle (nothing is unpickled), and the first one outside the allow-list is
   refused, naming the file, the entry and the global.
2. :func:`safe_checkpoint_loading` (a context, around ``pretrain``): the three readers above
   replaced by ones that check the same and then unpickle with torch's weights-only unpickler
   (``.metadata`` with :mod:`.metadata`'s allow-list). It covers a
   file changed after the check and anything megatron reads on its own.

Allow-list, enumerated from every byte entry of trainer checkpoints (fp32, bf16 with the
distributed optimizer, Qwen3-MoE): torch's weights-only set (tensors, storages, dtypes,
``OrderedDict``, ``_codecs.encode``), ``argparse.Namespace`` (the args), ``signal.Signals``
(``args.exit_signal``), numpy's ``ndarray``, ``dtype`` and ``_reconstruct`` (the numpy RNG
state), ``_io.BytesIO`` (transformer-engine's extra state, which megatron decodes with its own
restricted unpickler), and the ``enum.Enum`` classes of ``megatron.core`` modules (args and
the rerun state machine: ``ModelType``, ``AttnBackend``, ``RerunMode``, ...). Anything else
(``posix.system``, ``builtins.eval``, any other class or function) is refused before it is
looked up. A pickle the disassembler cannot read (not a ``torch.save`` archive, opcodes beyond
protocol 2) is refused too.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsafeCheckpointError

__all__ = ["UnsafeCheckpointError", "check_checkpoint_entries", "load_checked", "refusal",
           "safe_checkpoint_loading"]

TRUST_FLAG = "--eaft-trust-checkpoint"
COMMON_FILE = "common.pt"

_ALLOWED = frozenset({
    "argparse.Namespace", "signal.Signals", "_io.BytesIO",
    "numpy.ndarray", "numpy.dtype",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",  # numpy 2 / 1
})


def _allowed_object(name: str) -> Any | None:
    """The object a pickle ``GLOBAL name`` may resolve to, or None when it is not allowed."""
    module, _, attr = name.rpartition(".")
    if name not in _ALLOWED and not module.startswith("megatron.core."):
        return None
    try:  # only these names are imported: the modules above and megatron-core's own
        obj = getattr(importlib.import_module(module), attr)
    except Exception:  # noqa: BLE001 -- no such module or attribute: not allowed
        return None
    if name in _ALLOWED or (isinstance(obj, type) and issubclass(obj, enum.Enum)
                            and obj.__module__ == module and obj.__qualname__ == attr):
        return obj
    return None


def _globals_in(data: bytes, where: str) -> set[str]:
    """Every ``GLOBAL`` of the ``torch.save`` archive ``data``, read without unpickling."""
    import torch
    from torch import _weights_only_unpickler as wo

    try:
        with torch.serialization._open_zipfile_reader(io.BytesIO(data)) as archive:
            pkl = archive.get_record("data.pkl")
        return wo.get_globals_in_pkl(io.BytesIO(pkl))
    except Exception as e:  # not a zip archive, no data.pkl, opcodes beyond protocol 2, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UnsafeCheckpointError(
            f"{where} is not a torch.save pickle that can be checked without running it "
            f"({type(e).__name__}{': ' + first[:200] if first else ''}): refused") from None


def _check(data: bytes, where: str) -> list[tuple[Any, str]]:
    """Refuse ``data`` unless every global in it is torch's weights-only set or allowed here;
    the allowed extras as ``(object, name)`` for ``torch.serialization.safe_globals``."""
    from torch import _weights_only_unpickler as wo

    default = wo._get_allowed_globals()
    extra = []
    for name in sorted(_globals_in(data, where) - set(default)):
        obj = _allowed_object(name)
        if obj is None:
            raise UnsafeCheckpointError(
                f"{where} refers to {name}, which a Megatron checkpoint never stores: refused "
                f"(unpickling it could run code; {TRUST_FLAG} loads it anyway, allowing "
                f"arbitrary code execution)")
        extra.append((obj, name))
    return extra


def load_checked(data: bytes, where: str, *, record: bool = True) -> Any:
    """Unpickle one ``torch.save`` archive: globals checked first (:func:`_check`), then
    torch's weights-only unpickler with exactly those extras. ``where`` names it in errors;
    ``record=False``: a refusal is only raised, not kept for :func:`refusal`."""
    import pickle

    import torch

    try:
        extra = _check(data, where)
        try:
            with torch.serialization.safe_globals(extra):
                return torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise UnsafeCheckpointError(
                f"{where} refused by torch's weights-only unpickler ({first[:300]})") from None
    except UnsafeCheckpointError as e:
        if record:  # megatron/torch wrap what a load raises: the trainer says this
            _refused.append(str(e))
        raise


def _entry(file: str | os.PathLike, fqn: str) -> str:
    return f"{file}, entry {fqn},"


def check_checkpoint_entries(iteration_dir: str | os.PathLike, metadata: Any) -> None:
    """Check every byte entry of a torch_dist iteration directory (``metadata``: its
    ``.metadata``, read safely and validated) and its ``common.pt`` if any, without unpickling
    them; raises :class:`UnsafeCheckpointError` naming the file, entry and refused global."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    iteration_dir = Path(iteration_dir)
    if not (iteration_dir / "metadata.json").is_file() and \
            any(p.name.startswith("mp_rank_") for p in iteration_dir.iterdir()):
        raise UnsafeCheckpointError(
            f"{iteration_dir} holds legacy torch-format files (mp_rank_*) and no metadata.json: "
            f"megatron-core would unpickle them freely; refused (only torch_dist is loaded)")
    by_file: dict[str, list] = {}
    for index, info in (metadata.storage_data or {}).items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            by_file.setdefault(info.relative_path, []).append((index.fqn, info))
    for name, entries in sorted(by_file.items()):
        path = iteration_dir / name
        with open(path, "rb") as f:
            for fqn, info in sorted(entries, key=lambda e: e[1].offset):
                if info.transform_descriptors:
                    raise UnsafeCheckpointError(
                        f"{_entry(path, fqn)} is stored with transforms "
                        f"{list(info.transform_descriptors)}, which the safe loader does not "
                        f"read: refused ({TRUST_FLAG} loads it anyway)")
                f.seek(info.offset)
                _check(f.read(info.length), _entry(path, fqn))
    common = iteration_dir / COMMON_FILE
    if common.is_file():
        _check(common.read_bytes(), f"{common}")


# ---------------------------------------------------------------------------------------------
# The readers, replaced for the duration of a load

_refused: list[str] = []
_reading = threading.local()  # the FileSystemReader whose read_data is running


def refusal() -> str | None:
    """The first refusal of this process (None if nothing was refused)."""
    return _refused[0] if _refused else None


def _wrap_read_data(original):
    def read_data(self, plan, planner):
        _reading.reader = self
        try:
            return original(self, plan, planner)
        finally:
            _reading.reader = None

    return read_data


def _wrap_load_bytes(original):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        reader = getattr(_reading, "reader", None)
        info = getattr(reader, "storage_data", {}).get(read_item.storage_index)
        file = os.path.join(str(reader.path), info.relative_path) if info is not None \
            else "a torch_dist checkpoint"
        obj = load_checked(value.getvalue(), _entry(file, read_item.storage_index.fqn))
        if self.flatten_state_dict:  # what DefaultLoadPlanner.load_bytes does with the object
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    return load_bytes


def _wrap_read_metadata(original):
    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        from .metadata import parse_checkpoint_metadata

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            data = f.read()
        try:
            metadata = parse_checkpoint_metadata(data, path)
        except CheckpointError as e:
            _refused.append(str(e))
            raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    return read_metadata


def _wrap_load_common(original):
    def load_common(checkpoint_dir):
        path = os.path.join(checkpoint_dir, COMMON_FILE)
        if not os.path.isfile(path):
            return original(checkpoint_dir)  # megatron's own "does not exist" error
        with open(path, "rb") as f:
            return load_checked(f.read(), path)

    return load_common


@contextlib.contextmanager
def safe_checkpoint_loading(enabled: bool = True) -> Iterator[None]:
    """Within the context, torch_dist loading unpickles nothing freely (see the module doc)."""
    if not enabled:
        yield
        return
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import common
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner
    from torch.distributed.checkpoint import default_planner, filesystem

    from ..compat.patching import patch, unpatch

    saved: list = []
    try:
        patch(default_planner.DefaultLoadPlanner, "load_bytes", _wrap_load_bytes, saved)
        patch(filesystem.FileSystemReader, "read_data", _wrap_read_data, saved)
        patch(filesystem.FileSystemReader, "read_metadata", _wrap_read_metadata, saved)
        patch(serialization, "load_common", _wrap_load_common, saved)
        patch(common, "load_common", _wrap_load_common, saved)
        if MCoreLoadPlanner.load_bytes is not default_planner.DefaultLoadPlanner.load_bytes:
            raise ImportError("megatron-core's MCoreLoadPlanner has its own load_bytes: "
                              "eaft_megatron.checkpoint.safe_load does not cover it")
        yield
    finally:
        unpatch(saved)
