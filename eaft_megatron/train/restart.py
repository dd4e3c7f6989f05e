"""Where a run starts: resume its own latest checkpoint, or fine-tune from a pretrained one.

Megatron-LM's restart idiom, made strict so that a requeued job (the identical command run
again) can never roll back::

    --load RUN --save RUN --pretrained-checkpoint CKPT    # Megatron-LM's form
    --load CKPT --save RUN                                 # converted CKPT: the same meaning

Rules, applied before any process group exists (:func:`resolve_start`):

1. ``--save RUN`` holds a complete checkpoint (its tracker names an iteration directory whose
   torch_dist ``.metadata`` exists): resume from it (model, optimizer, scheduler, RNG, data
   position), whatever ``--load`` / ``--pretrained-checkpoint`` / ``--finetune`` say; one line
   says so. Iteration directories newer than the tracker (a save killed half-way) are
   incomplete by construction and are overwritten when the run gets there.
2. Otherwise ``--load`` when it holds a checkpoint (a converted model is always loaded with
   ``--finetune``: weights only, iteration 0), else ``--pretrained-checkpoint`` (with
   ``--finetune``); a directory that was named and holds no checkpoint is an error, never a
   silent random initialisation. Only a command with neither flag starts from random weights.
   Either flag may name a Hugging Face model directory (``config.json`` + safetensors, no
   tracker: :func:`.hf_load.is_hf_model_dir`): weights only, iteration 0, read by every rank
   from the HF files (``Start.hf``; Megatron gets no ``--load``).
3. A start that would overwrite newer work is refused: ``--ckpt-step`` pointing below the
   latest complete checkpoint of ``--save``, complete iteration directories without a tracker.
   (The trainer's save guard, :mod:`.guard`, also refuses to save below such an iteration.)

Megatron then receives one unambiguous form: ``--load SRC`` (+ ``--finetune``), without
``--pretrained-checkpoint``; or, from a HF directory, no ``--load`` at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import (
    TRACKER,
    CheckpointError,
    complete_iterations,
    is_complete,
    is_converted,
    iteration_dir_name,
    latest_complete,
)
from .hf_load import is_hf_model_dir

__all__ = ["CheckpointError", "Start", "complete_iterations", "latest_complete", "resolve_start"]

@dataclass
class Start:
    """The decision: ``load`` (None: random init or ``hf``), ``finetune``, ``resumed`` (from
    --save), ``iteration`` it starts at, one human line ``note``, and ``hf``: the Hugging Face
    model directory the weights are read from (None otherwise), ``hf_flag`` the flag naming it."""

    load: str | None
    finetune: bool
    resumed: bool
    iteration: int
    note: str
    hf: str | None = None
    hf_flag: str | None = None


def _must_hold_checkpoint(flag: str, root: str) -> int:
    path = Path(root)
    if not path.is_dir():
        raise CheckpointError(f"{flag} {root}: no such directory")
    iteration = latest_complete(path)
    if iteration is None:
        raise CheckpointError(f"{flag} {root}: no checkpoint there (no {TRACKER}); refusing to "
                              "train from random weights (omit --load/--pretrained-checkpoint "
                              "to do that on purpose)")
    return iteration


def resolve_start(*, load: str | None, save: str | None, pretrained: str | None,
                  finetune: bool, ckpt_step: int | None, training: bool) -> Start:
    """Apply the module's rules; raises :class:`CheckpointError` with a one-line message."""
    newest = latest_complete(save) if (save and training) else None
    if newest is not None:
        if ckpt_step is not None and ckpt_step != newest:
            raise CheckpointError(
                f"--ckpt-step {ckpt_step}: {save} already holds iteration {newest}; resuming "
                f"anywhere else would overwrite newer checkpoints (use another --save)")
        ignored = [f"{f} {v}" for f, v in (("--load", load), ("--pretrained-checkpoint",
                                                              pretrained)) if v and
                   Path(v).resolve() != Path(save).resolve()]
        note = (f"resuming from {Path(save) / iteration_dir_name(newest)} (the latest complete "
                f"checkpoint in --save)" + (f"; not loading {', '.join(ignored)}" if ignored
                                            else ""))
        return Start(load=save, finetune=False, resumed=True, iteration=newest, note=note)

    if load is not None and Path(load).is_dir() and latest_complete(load) is not None:
        source, flag = load, "--load"
    elif pretrained is not None:
        source, flag = pretrained, "--pretrained-checkpoint"
    elif load is not None:
        source, flag = load, "--load"
    else:
        return Start(load=None, finetune=False, resumed=False, iteration=0,
                     note="no --load/--pretrained-checkpoint: starting from random weights")
    if is_hf_model_dir(source):
        if ckpt_step is not None:
            raise CheckpointError(f"--ckpt-step {ckpt_step}: {flag} {source} is a Hugging Face "
                                  f"model directory, which has no iterations")
        return Start(load=None, finetune=False, resumed=False, iteration=0, hf=source,
                     hf_flag=flag, note=f"loading the Hugging Face model {source} (weights "
                     f"only, from iteration 0; each rank reads its own share)")
    iteration = _must_hold_checkpoint(flag, source)
    if ckpt_step is not None and source is load:
        if not is_complete(Path(load) / iteration_dir_name(ckpt_step)):
            raise CheckpointError(f"--ckpt-step {ckpt_step}: {load} has no complete "
                                  f"{iteration_dir_name(ckpt_step)} (found "
                                  f"{complete_iterations(load)})")
        iteration = ckpt_step
    finetune = finetune or flag == "--pretrained-checkpoint" or is_converted(source)
    what = "weights only, from iteration 0" if finetune else f"resuming at iteration {iteration}"
    return Start(load=source, finetune=finetune, resumed=False, iteration=0 if finetune
                 else iteration, note=f"loading {source} ({what})")
