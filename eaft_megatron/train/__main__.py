"""``torchrun --nproc-per-node N -m eaft_megatron.train <Megatron-LM flags> <EAFT flags>``;
``python -m eaft_megatron.train ...`` (no torchrun) runs as a single process of one rank."""

import os
import sys

from .main import cached_help, main, wants_help


def single_process_defaults() -> None:
    """Without torchrun (no ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``), the environment of a
    launch of one process (rank 0 of 1, a free port on 127.0.0.1), so that Megatron's
    ``env://`` rendezvous works instead of failing on the missing ``MASTER_ADDR``."""
    if any(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        return
    from ..compat.processes import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def quiet_no_cuda_notice() -> None:
    """Drop torch's "No CUDA runtime is found, using CUDA_HOME=..." warning (logged when
    megatron imports ``torch.utils.cpp_extension`` on a machine without a GPU: it says nothing
    about a CPU run, and was the first line of ``--help``); its other messages stay."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not str(record.msg).startswith("No CUDA runtime is found"))


if __name__ == "__main__":  # spawned helpers (checkpoint saving's Manager) re-import this module
    if wants_help(sys.argv[1:]) and cached_help() is not None:
        sys.exit(main())  # the text of an earlier --help: no torch, no megatron to import
    quiet_no_cuda_notice()
    from ..compat.lazy_compile import defer_torch_compile

    defer_torch_compile()  # before megatron's import: its jit helpers compile on first use
    single_process_defaults()
    sys.exit(main())
