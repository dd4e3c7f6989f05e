"""``torchrun --nproc-per-node N -m eaft_megatron.train <Megatron-LM flags> <EAFT flags>``."""

import sys

from .main import main

if __name__ == "__main__":  # spawned helpers (checkpoint saving's Manager) re-import this module
    from ..compat.lazy_compile import defer_torch_compile

    defer_torch_compile()  # before megatron's import: its jit helpers compile on first use
    sys.exit(main())
