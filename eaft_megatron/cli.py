"""The ``eaft-megatron`` console command.

    eaft-megatron info          # versions, devices and optional accelerations found

Sub-commands are registered here and implemented in their own modules (conversion, data
preparation, training, demo), imported only when used so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys


def _info(_args) -> int:
    import torch

    def version(dist_name: str) -> str:
        try:
            return importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    print(f"eaft-megatron      {version('eaft-megatron')}")
    print(f"python             {sys.version.split()[0]}")
    print(f"torch              {torch.__version__}")
    print(f"megatron-core      {version('megatron-core')}")
    print(f"transformers       {version('transformers')}")
    print(f"transformer-engine {version('transformer-engine')} (optional, GPU)")
    cuda = torch.cuda.is_available()
    print(f"device             {'cuda x%d' % torch.cuda.device_count() if cuda else 'cpu (gloo)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eaft-megatron",
        description="Entropy-Adaptive Fine-Tuning (EAFT) for Megatron-Core.",
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('eaft-megatron')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="print versions and the devices found")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
