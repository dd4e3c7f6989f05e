"""Thin script over ``eaft-megatron convert``:

    python tools/convert_checkpoint.py hf-to-megatron --hf DIR --out DIR --tp 2 --pp 2
    python tools/convert_checkpoint.py megatron-to-hf --megatron DIR --out DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eaft_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
