"""Thin script over the console command, for checkouts that are not pip-installed:

    python tools/eaft_megatron.py info
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eaft_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
