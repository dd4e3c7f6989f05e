"""Thin script over ``eaft-megatron preprocess``, for checkouts that are not pip-installed:

    python tools/preprocess_data.py --input chat.jsonl --tokenizer /models/Qwen3-8B \\
        --output-prefix data/chat --seq-length 4096 --pack --workers 8
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eaft_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
