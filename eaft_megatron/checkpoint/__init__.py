"""Megatron checkpoints: one home for their layout, their safe reading and torch_dist I/O.

- :mod:`.errors`: :class:`CheckpointError`, the one error type (``convert.ConversionError`` is
  the same class), and :class:`UnsafeCheckpointError` for allow-list refusals;
- :mod:`.layout`: the tracker file, ``iter_XXXXXXX`` directory names, when an iteration is
  complete, the conversion marker, the stored ``hf/`` directory and the one finder for it
  (pure path logic);
- :mod:`.metadata`: a torch_dist ``.metadata`` read with an allow-listed unpickler, and the
  data files it names checked;
- :mod:`.safe_load`: every pickled entry checked before loading, and megatron-core's readers
  replaced for the duration of a load (the trainer);
- :mod:`.torch_dist`: saving and loading a model's torch_dist checkpoint as Megatron-LM lays
  it out (the converter and the demo).

Used by ``convert``, ``train`` and ``demo``; imports only ``compat`` and ``paths`` of this
package. The names of :mod:`.metadata` and :mod:`.torch_dist` (torch, megatron-core) are
imported lazily.
"""

from importlib import import_module

from .errors import CheckpointError, UnsafeCheckpointError
from .layout import (
    CONVERTED_MARK,
    HF_DIR,
    HF_SIDE_FILES,
    METADATA_FILE,
    TRACKER,
    complete_iterations,
    copy_side_files,
    find_hf_dir,
    find_iteration_dir,
    is_complete,
    is_converted,
    iteration_dir_name,
    latest_complete,
    read_tracker,
    store_hf_dir,
    write_tracker,
)

_LAZY = {
    "checkpoint_tensor_shapes": ".metadata",
    "read_checkpoint_metadata": ".metadata",
    "validate_checkpoint_metadata": ".metadata",
    "load_model_weights": ".torch_dist",
    "megatron_process_group": ".torch_dist",
    "save_model_checkpoint": ".torch_dist",
}

__all__ = ["CONVERTED_MARK", "HF_DIR", "HF_SIDE_FILES", "METADATA_FILE", "TRACKER",
           "CheckpointError", "UnsafeCheckpointError", "complete_iterations", "copy_side_files",
           "find_hf_dir", "find_iteration_dir", "is_complete", "is_converted",
           "iteration_dir_name", "latest_complete", "read_tracker", "store_hf_dir",
           "write_tracker", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
