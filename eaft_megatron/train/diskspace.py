"""A checkpoint save that does not fit on ``--save``'s filesystem, named as such.

Before every save (:func:`check_free_space`, called by the guard's ``save_checkpoint`` wrapper
on every rank) the size of the checkpoint is estimated from the parameters each rank holds and
the optimizer state Megatron saves with them (fp32 main copy of 16-bit parameters, Adam's two
moments), summed over the ranks and divided by the data-parallel size (replicas are written
once), and compared with the free space of ``--save`` (read on rank 0): too little stops the run
before anything is written. A save that fails anyway (other writers, an estimate short of the
real size) with ``ENOSPC`` on any rank -- torch's ``CheckpointException ranks:dict_keys([0, 1])``
-- is turned into the same message (:func:`no_space_error`; torch's writer may report it as
``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, so a failed save with
less free space left than the estimate counts too). Either way the last complete
checkpoint stays as it was (Megatron updates the tracker only after a complete save), and the
guard removes the failed save's partly written ``iter_XXXXXXX``; the run exits 2."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["check_free_space", "enospc_in", "estimate_checkpoint_bytes", "mount_of",
           "no_space_error", "no_space_message", "short_write_in"]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def mount_of(path: str | os.PathLike) -> Path:
    """The mount point holding ``path`` (its nearest existing ancestor's filesystem)."""
    p = Path(path).resolve()
    while not p.exists() and p.parent != p:
        p = p.parent
    dev = p.stat().st_dev
    while p.parent != p and p.parent.stat().st_dev == dev:
        p = p.parent
    return p


def _free(path: str | os.PathLike) -> int:
    p = Path(path).resolve()
    while not p.exists() and p.parent != p:
        p = p.parent
    return shutil.disk_usage(p).free


def no_space_message(save: str, iteration: int, *, needed: int | None, last: str,
                     free: int | None = None, ran_out: bool = False) -> str:
    """The one line: device (mount point) and path, the estimate and the free space (``free``,
    else measured now). ``ran_out``: the save ran out of space mid-write, so it needed more
    than the free space even where the estimate said it would fit."""
    free = _free(save) if free is None else free
    more = "more than " if ran_out and needed and free >= needed else ""
    need = f"needed {more}~{_size(needed)}, " if needed else ""
    return (f"no space left on {mount_of(save)} for {save} ({need}free "
            f"{_size(free)}) to save the checkpoint of iteration {iteration}"
            f"; the last complete checkpoint is {last}: free space or give another --save "
            f"(with --load at the old one), then rerun")


def estimate_checkpoint_bytes(model: Any, args: Any) -> int:
    """This rank's share of the checkpoint (see the module doc), before the sum over ranks."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    params = [p for chunk in chunks for p in chunk.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    numel = sum(p.numel() for p in params)
    if getattr(args, "no_save_optim", False):
        return weights
    main = 4 * numel if (getattr(args, "bf16", False) or getattr(args, "fp16", False)) else 0
    moments = 2 * 4 * numel if getattr(args, "optimizer", "adam") == "adam" else 4 * numel
    return weights + main + moments


def check_free_space(model: Any, args: Any, iteration: int, *,
                     last: str) -> tuple[int, int, str | None]:
    """On every rank (one all-reduce): the estimated size of the checkpoint about to be saved,
    the free space of ``--save`` (read on rank 0), and the refusal line when it does not fit
    (else None)."""
    import torch

    from ..compat.cpu import run_device

    share = float(estimate_checkpoint_bytes(model, args))
    free = float(_free(args.save)) if torch.distributed.get_rank() == 0 else 0.0
    total = torch.tensor([share, free], dtype=torch.float64, device=run_device())
    torch.distributed.all_reduce(total)
    needed = int(total[0].item() / max(1, getattr(args, "data_parallel_size", 1)))
    free = int(total[1].item())
    if needed <= free:
        return needed, free, None
    return needed, free, no_space_message(args.save, iteration, needed=needed, last=last,
                                          free=free)


def _chain(exc: BaseException):
    """``exc``, its cause/context chain and (torch's ``CheckpointException``) every rank's
    failure, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for value in failures.values():
                todo.append(value[0] if isinstance(value, tuple) else value)
        todo += [e.__cause__, e.__context__]


def enospc_in(exc: BaseException) -> OSError | None:
    """The ``ENOSPC`` OSError in ``exc``: itself, its cause/context chain, or (torch's
    ``CheckpointException``) any rank's failure."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno == errno.ENOSPC),
                None)


def short_write_in(exc: BaseException) -> bool:
    """Whether torch's file writer reported a short write in ``exc`` (how it reports a full
    disk: ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, no errno)."""
    return any("unexpected pos" in str(e) for e in _chain(exc))


def no_space_error(exc: BaseException, args: Any, iteration: int, *, needed: int,
                   last: str, free: int | None = None) -> str | None:
    """The refusal line for a save that failed with ``ENOSPC`` or a short write (on any rank),
    or failed in any way while ``--save`` now has less free space than the checkpoint needs;
    else None. ``free``: the free space measured before the save (:func:`check_free_space`),
    reported instead of what is left now (a partial save may still fill the disk)."""
    if enospc_in(exc) is None and not short_write_in(exc) and _free(args.save) >= needed:
        return None
    return no_space_message(args.save, iteration, needed=needed, last=last, free=free,
                            ran_out=True)
