import sys

from .cli import main
from .compat.lazy_compile import defer_torch_compile

defer_torch_compile()  # before megatron's import: its jit helpers compile on first use
sys.exit(main())
