"""The non-finite guard: a diverging run stops, says where, and never saves a poisoned checkpoint.

Always on, whatever ``--check-for-nan-in-loss-and-grad`` says (Megatron's own check stays as the
user sets it and may report first):

- loss: the loss function raises :class:`NonFiniteError` on a non-finite loss (training or
  evaluation), before the backward pass (:func:`check_loss`);
- gradient norm: after every training step all ranks agree (one 2-value all-reduce) whether the
  loss or the gradient norm was non-finite, and stop together; an iteration the fp16 loss scaler
  skipped is not a divergence;
- parameters: before every checkpoint save all ranks agree (one all-reduce) that their
  parameters are finite; otherwise nothing is written. The save is also refused when ``--save``
  already holds a complete checkpoint newer than the iteration being saved, and skipped when it
  holds exactly this iteration (a requeued run that had already finished);
- disk space: a checkpoint that does not fit in ``--save``'s free space (estimated before the
  save) or a save failing with ``ENOSPC`` stops with "no space left on MOUNT for SAVE (needed ~X,
  free Y)" (:mod:`.diskspace`).

The message names the iteration, the value and the last good checkpoint; the entry point prints
it once and exits with the stop's ``code``: 3 for a divergence or a save that would roll back,
2 for a full disk (something for the user to fix, like every other mistake). A save that failed
mid-write for lack of space leaves no partly written ``iter_XXXXXXX`` behind: rank 0 removes it
(unless the tracker already names it), so the last complete checkpoint is what a rerun finds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..compat.cpu import run_device
from ..compat.patching import patch, unpatch
from ..checkpoint import iteration_dir_name, latest_complete

__all__ = ["NonFiniteError", "RunStopped", "check_loss", "install_guard", "last_good_checkpoint",
           "uninstall_guard"]

EXIT_CODE = 3
NO_SPACE_CODE = 2
_saved: list[tuple[Any, str, Any]] = []


class RunStopped(RuntimeError):
    """The guard stopped the run; ``report``: this rank prints the message."""

    def __init__(self, message: str, *, report: bool = True, code: int = EXIT_CODE) -> None:
        super().__init__(message)
        self.report = report
        self.code = code


class NonFiniteError(RunStopped, FloatingPointError):
    """Training diverged (non-finite loss, gradient norm or parameters)."""


def last_good_checkpoint(args: Any) -> str:
    """The newest complete checkpoint of ``--save`` (else of ``--load``), or ``none``."""
    for root in (getattr(args, "save", None), getattr(args, "load", None)):
        try:
            iteration = latest_complete(root)
        except ValueError:
            iteration = None
        if iteration is not None:
            return str(Path(root) / iteration_dir_name(iteration))
    return "none"


def _advice(args: Any) -> str:
    return (f"Last good checkpoint: {last_good_checkpoint(args)}. Nothing was saved after it. "
            "Lower --lr (or raise --lr-warmup-*), check the data, then rerun the same "
            "command: it continues from there.")


def check_loss(loss_sum: torch.Tensor, *, where: str, loss_type: str) -> None:
    """Raise :class:`NonFiniteError` when the summed loss of a micro-batch is not finite."""
    if bool(torch.isfinite(loss_sum).all()):
        return
    from megatron.core import parallel_state
    from megatron.training import get_args

    args = get_args()
    iteration = getattr(args, "curr_iteration", args.iteration) + (where == "train")
    raise NonFiniteError(
        f"non-finite {loss_type} loss ({loss_sum.item()}) in {where} at iteration {iteration}; "
        f"stopping. {_advice(args)}",
        report=not parallel_state.model_parallel_is_initialized()
        or parallel_state.get_tensor_model_parallel_rank() == 0)


def _finite_loss_values(loss_dict: dict) -> tuple[bool, float]:
    bad = [float(v) for v in loss_dict.values() if not math.isfinite(float(v))]
    return (not bad), (bad[0] if bad else 0.0)


def _agree(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over all ranks (non-finite values propagate)."""
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32,
                     device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _nonfinite_parameters(model: Any) -> list[str]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    bad = []
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if not bool(torch.isfinite(p.detach()).all()):
                bad.append(name)
    return bad


def _remove_partial_save(save: str, iteration: int) -> None:
    """Remove ``save``'s ``iter_XXXXXXX`` of a save that failed, unless the tracker names it
    (then the save completed and something after it failed). Torch's checkpoint writers raise
    on every rank only after all ranks' writes returned, so nothing is still writing there."""
    import shutil

    try:
        if latest_complete(save) == iteration:
            return
    except ValueError:
        pass  # a complete directory without a tracker: the failed save's own, remove it
    shutil.rmtree(Path(save) / iteration_dir_name(iteration), ignore_errors=True)


def install_guard() -> None:
    """Wrap ``train_step`` and ``save_checkpoint`` of Megatron's loop (idempotent)."""
    uninstall_guard()
    import megatron.training.training as loop
    from megatron.training import get_args

    def wrap_train_step(original):
        def train_step(*a, **kw):
            result = original(*a, **kw)
            loss_dict, skipped_iter, grad_norm = result[0], result[1], result[5]
            args = get_args()
            rank = torch.distributed.get_rank()
            last = rank == torch.distributed.get_world_size() - 1
            loss_ok, loss_value = _finite_loss_values(loss_dict) if loss_dict else (True, 0.0)
            grad_ok = skipped_iter or grad_norm is None or math.isfinite(float(grad_norm))
            flags = _agree([float(not loss_ok), float(not grad_ok),
                            loss_value if last else 0.0,
                            float(grad_norm) if (rank == 0 and grad_norm is not None) else 0.0],
                           run_device())
            if flags[0] or flags[1]:
                what = (f"non-finite loss ({flags[2]})" if flags[0] else
                        f"non-finite gradient norm ({flags[3]})")
                raise NonFiniteError(
                    f"{what} at iteration {args.curr_iteration + 1}; stopping before any "
                    f"checkpoint of it. {_advice(args)}", report=rank == 0)
            return result

        return train_step

    def wrap_save_checkpoint(original):
        def save_checkpoint(iteration, model, *a, **kw):
            args = get_args()
            rank = torch.distributed.get_rank()
            bad = _nonfinite_parameters(model)
            if bad:
                print(f"eaft_megatron.train: rank {rank}: non-finite parameters: "
                      f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}", flush=True)
            [bad_ranks] = _agree([float(bool(bad))], run_device())
            if bad_ranks:
                raise NonFiniteError(
                    f"not saving the checkpoint of iteration {iteration}: non-finite parameters "
                    f"on {int(bad_ranks)} rank(s); stopping. {_advice(args)}", report=rank == 0)
            newest = latest_complete(args.save) if not kw.get("non_persistent_ckpt") else None
            if newest is not None and newest > iteration:
                raise RunStopped(  # never roll back: see eaft_megatron.train.restart
                    f"not saving iteration {iteration}: {args.save} already holds iteration "
                    f"{newest}", report=rank == 0)
            if newest is not None and newest == iteration:
                if rank == 0:
                    print(f"> eaft_megatron.train: iteration {iteration} is already saved in "
                          f"{args.save}; not writing it again", flush=True)
                return None
            from .diskspace import check_free_space, no_space_error

            needed, free = 0, None
            if not kw.get("non_persistent_ckpt"):
                needed, free, short = check_free_space(model, args, iteration,
                                                       last=last_good_checkpoint(args))
                if short:
                    raise RunStopped(short, report=rank == 0, code=NO_SPACE_CODE)
            try:
                return original(iteration, model, *a, **kw)
            except BaseException as e:  # torch's CheckpointException is a BaseException
                full = no_space_error(e, args, iteration, needed=needed, free=free,
                                      last=last_good_checkpoint(args))
                if full is None:
                    raise
                if rank == 0 and not kw.get("non_persistent_ckpt"):
                    _remove_partial_save(args.save, iteration)
                raise RunStopped(full, report=rank == 0, code=NO_SPACE_CODE) from None

        return save_checkpoint

    patch(loop, "train_step", wrap_train_step, _saved)
    patch(loop, "save_checkpoint", wrap_save_checkpoint, _saved)


def uninstall_guard() -> None:
    unpatch(_saved)
