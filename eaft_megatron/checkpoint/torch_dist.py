"""Megatron-Core distributed checkpoints (torch_dist) of a model, as Megatron-LM lays them out.

    <root>/latest_checkpointed_iteration.txt     "0" (or "release")     (:mod:`.layout`)
    <root>/iter_0000000/                           dist_checkpointing.save(...) output

The state written is the one ``megatron.training`` writes (``model`` = the model's sharded
state dict, ``iteration``, ``checkpoint_version``, ``args`` with the parallel sizes), so
``pretrain(..., --load/--finetune)`` reads it; torch_dist stores global tensors, so it loads at
any TP/PP that divides the model.

Reading is restricted to what a model needs and what cannot run code: ``.metadata`` goes
through :mod:`.metadata` (an allow-listed unpickler) before megatron-core sees the
directory, and only tensors are requested from megatron-core's torch_dist strategy (no common
state, no ``_extra_state`` objects: torch's loader unpickles those byte entries with
``weights_only=False``). Tensor data itself is read with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import CheckpointError
from .layout import iteration_dir_name, write_tracker
from .metadata import validate_checkpoint_metadata

__all__ = ["expand_factories", "load_model_weights", "megatron_process_group",
           "save_model_checkpoint", "tensors_only"]

_VOCAB_TENSORS = ("embedding.", "output_layer.")


@contextlib.contextmanager
def megatron_process_group(tp: int = 1, pp: int = 1):
    """Make sure torch.distributed and Megatron's parallel state exist (a one-process gloo
    group when run outside torchrun), with the CPU layer when there is no GPU; undo on exit
    whatever this call set up."""
    from megatron.core import parallel_state

    from ..compat import cpu_compat_installed, install_cpu_compat, uninstall_cpu_compat

    installed_cpu = not cpu_compat_installed() and install_cpu_compat()
    created_pg = False
    if not dist.is_initialized():
        # An in-memory store: no port to pick (and no MASTER_PORT left in the environment for
        # child processes to collide on).
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        created_pg = True
    created_mp = False
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
        created_mp = True
    try:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
        yield
    finally:
        if created_mp:
            parallel_state.destroy_model_parallel()
        if created_pg:
            dist.destroy_process_group()
        if installed_cpu:
            uninstall_cpu_compat()


def expand_factories(sharded, *, consume: bool, _freed: list | None = None) -> None:
    """Replace Megatron's ShardedTensorFactory entries (the SwiGLU ``linear_fc1``: ``chunk`` on
    save, ``cat`` on load) by the ShardedTensors they build, in place in ``sharded``.

    Their data are views of the parameter, so loading writes straight into it (no concatenated
    copy of every fc1). With ``consume`` (saving a model that is not used afterwards), each
    half is copied out and the parameter's storage is released at once: the writer would
    otherwise clone every view, doubling the memory of all fc1 weights at the same time. The
    released parameters are small heap blocks when there are many experts (512 KiB each for
    a 128-expert 1B model), which glibc keeps mapped: the heap is trimmed every
    ``_TRIM_BYTES`` released (measured: +0.36 GiB = +0.2x the checkpoint without it).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    top = _freed is None
    freed = [0] if top else _freed
    items = sharded.items() if isinstance(sharded, dict) else enumerate(sharded)
    for key, value in list(items):
        if isinstance(value, (dict, list)):
            expand_factories(value, consume=consume, _freed=freed)
        elif isinstance(value, ShardedTensorFactory):
            built = value.build()
            if consume:
                for part in built if isinstance(built, list) else built.values():
                    part.data = part.data.clone()
                storage = value.data.untyped_storage()
                freed[0] += storage.nbytes()
                storage.resize_(0)
                if freed[0] >= _TRIM_BYTES:
                    _trim_heap()
                    freed[0] = 0
            sharded[key] = built
    if top and consume:
        _trim_heap()


_TRIM_BYTES = 64 << 20


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``; elsewhere nothing)."""
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def save_model_checkpoint(
    models: list[torch.nn.Module], root: Path, *, iteration: int = 0, args: dict | None = None,
    consume: bool = False, names: set[str] | None = None,
) -> Path:
    """Write ``models`` (one per virtual pipeline chunk) as a Megatron-LM torch_dist checkpoint
    under ``root``; every rank of the model-parallel group calls this. ``consume=True`` lets
    the save release parameter memory as it goes (the models are unusable afterwards).
    ``names``: this rank writes only these state-dict entries of a single model, each as its
    main replica (``convert hf-to-megatron --nproc``: the ranks of one world each hold the
    whole model's layout but fill and write their own share; every entry must be named on
    exactly one rank, which megatron-core's sharding validation checks)."""
    from megatron.core import dist_checkpointing

    from ..compat.processes import in_process_checkpoint_writes

    path = root / iteration_dir_name(iteration)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "args": argparse.Namespace(**(args or {})),
    }
    if len(models) == 1:
        state["model"] = models[0].sharded_state_dict()
    else:
        for i, m in enumerate(models):
            state[f"model{i}"] = m.sharded_state_dict()
    if names is not None:
        assert len(models) == 1, "names= selects entries of one model"
        state["model"] = {k: v for k, v in state["model"].items() if k in names}
    if consume:
        expand_factories(state, consume=True)
    if names is not None:
        _make_main_replicas(state["model"])
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with in_process_checkpoint_writes():  # no spawned manager process (compat.processes)
            dist_checkpointing.save(state, str(path))
    except CheckpointException as e:
        _reraise_interrupt(e)
        raise
    if dist.get_rank() == 0:
        write_tracker(root, iteration)
    dist.barrier()
    return path


def _make_main_replicas(sharded) -> None:
    """Mark every entry of ``sharded`` as the main replica (the one that is written)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    for t in nested_values(sharded):
        if isinstance(t, (ShardedTensor, ShardedObject)):
            t.replica_id = 0


def tensors_only(sharded):
    """The sharded state dict without its ShardedObjects (byte entries unpickled on load)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if isinstance(sharded, dict):
        return {k: tensors_only(v) for k, v in sharded.items() if not isinstance(v, ShardedObject)}
    if isinstance(sharded, list):
        return [tensors_only(v) for v in sharded if not isinstance(v, ShardedObject)]
    return sharded


def _check_requested_tensors(sharded, meta, iteration_dir: Path) -> None:
    """Every tensor the model asks for is in the checkpoint with the model's global shape:
    otherwise one line naming them (torch_dist's own failure is a multi-rank report)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = {k: tuple(v.size) for k, v in meta.state_dict_metadata.items()
              if isinstance(v, TensorStorageMetadata)}
    missing, wrong = set(), {}
    for t in (v for v in nested_values(sharded) if isinstance(v, ShardedTensor)):
        if t.key not in stored:
            missing.add(t.key)
        elif tuple(t.global_shape) != stored[t.key]:
            wrong[t.key] = (stored[t.key], tuple(t.global_shape))
    if missing:
        raise CheckpointError(f"checkpoint {iteration_dir} lacks {len(missing)} tensor(s) the "
                              f"model needs: {sorted(missing)[:8]}")
    if wrong:
        key, (have, want) = sorted(wrong.items())[0]
        raise CheckpointError(f"checkpoint {iteration_dir}: tensor {key!r} has shape {have}, "
                              f"the model expects {want}"
                              + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))


def load_model_weights(models: list[torch.nn.Module], iteration_dir: Path, *,
                       names: set[str] | None = None) -> None:
    """Fill ``models`` from a torch_dist checkpoint (converted or written by the trainer, any
    TP/PP); every parameter must be found, extra entries (optimizer state...) are ignored.
    ``names``: fill only these state-dict entries of a single model (the others are neither
    read nor touched: ``convert megatron-to-hf --nproc``); every rank of a world of two or
    more calls this, each with its own non-empty names (in a world of one, megatron-core
    places a layer-stacked tensor's other layers on rank 0 too: request them all)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
    from torch.distributed.checkpoint.api import CheckpointException

    meta = validate_checkpoint_metadata(iteration_dir)
    if len(models) == 1:
        sharded = {"model": models[0].sharded_state_dict()}
    else:
        sharded = {f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)}
    if names is not None:
        assert len(models) == 1, "names= selects entries of one model"
        sharded["model"] = {k: v for k, v in sharded["model"].items() if k in names}
    expand_factories(sharded, consume=False)  # load fc1 halves in place
    sharded = tensors_only(sharded)
    _check_requested_tensors(sharded, meta, iteration_dir)
    # torch_dist reads every tensor into a temporary before copying it into place: loading the
    # vocabulary-sized tensors first, while little else is resident, keeps that temporary out
    # of the peak (measured: 1.32x -> ~1.0x the model for a 1.1B model).
    first = {name: {k: v for k, v in sd.items() if k.startswith(_VOCAB_TENSORS)}
             for name, sd in sharded.items()}
    rest = {name: {k: v for k, v in sd.items() if not k.startswith(_VOCAB_TENSORS)}
            for name, sd in sharded.items()}
    if names is not None:  # both loads are collectives: neither may be empty on any rank
        small = min(((k, v) for sd in (first, rest) for k, v in sd["model"].items()
                     if isinstance(v, ShardedTensor)), key=lambda kv: (kv[1].data.numel(), kv[0]))
        for part in (first, rest):
            if not part["model"]:  # (a copy of the entry: the load rewrites its .data view)
                part["model"][small[0]] = dataclasses.replace(small[1])
    strategy = TorchDistLoadShardedStrategy()
    try:
        loaded = {name: {} for name in sharded}
        for part in (first, rest):
            for name, sd in strategy.load(part, Path(iteration_dir)).items():
                loaded[name].update(sd)
    except (Exception, CheckpointException) as e:  # (CheckpointException is a BaseException)
        _reraise_interrupt(e)
        raise CheckpointError(f"cannot load model weights from {iteration_dir}: "
                              f"{_first_line(e)}") from e
    for i, m in enumerate(models):
        sd = loaded["model"] if len(models) == 1 else loaded[f"model{i}"]
        # The expanded fc1 entries (dense, routed and shared experts) were loaded in place
        # (lists of halves, each found in the checkpoint: _check_requested_tensors): exactly
        # those are not handed to load_state_dict.
        in_place = {k for k, v in sd.items() if not isinstance(v, torch.Tensor)}
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        missing, unexpected = m.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state") and k not in in_place
                   and (names is None or k in names)]
        if missing:
            raise CheckpointError(f"checkpoint {iteration_dir} lacks parameters: {missing[:10]}")


def _failures(e: BaseException) -> list[BaseException]:
    """The per-rank exceptions a DCP CheckpointException wraps (none for other exceptions)."""
    failures = getattr(e, "failures", None) or {}
    return [f[0] if isinstance(f, tuple) else f for f in failures.values()]  # (exc, traceback)


def _reraise_interrupt(e: BaseException) -> None:
    """DCP wraps whatever its steps raise, Ctrl-C / SIGTERM included: let those through."""
    for inner in _failures(e):
        if isinstance(inner, KeyboardInterrupt):
            raise inner from None


def _first_line(e: BaseException) -> str:
    """A one-line reason: DCP wraps the failure of each rank into a long multi-line text."""
    e = next(iter(_failures(e)), e)
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
