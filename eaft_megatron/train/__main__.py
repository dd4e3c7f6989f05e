"""``torchrun --nproc-per-node N -m eaft_megatron.train <Megatron-LM flags> <EAFT flags>``."""

import sys

from .main import main

if __name__ == "__main__":  # spawned helpers (checkpoint saving's Manager) re-import this module
    sys.exit(main())
