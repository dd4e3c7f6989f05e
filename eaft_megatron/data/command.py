"""The ``eaft-megatron preprocess`` sub-command: arguments, error reporting, exit codes.

Registering it imports nothing heavy (``--help`` stays instant); ``run`` imports the pipeline.
Exit codes: 0 done; 2 a mistake in the command or the data (one line ``eaft-megatron
preprocess: error: ...``: missing input, bad line ``file:line: reason``, unusable tokenizer,
output prefix overlapping an input, holding a dataset without ``--force`` or being written by
a live run, ...); 1 a failure of the run itself (a worker process died, an I/O error);
128 + signal when interrupted by SIGINT / SIGTERM (temporary files removed).
"""

from __future__ import annotations

import argparse
import sys

from .constants import OVERLONG
from .formats import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="JSONL files, read in the order given")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="Hugging Face tokenizer directory (its chat template is used) or "
                        "SentencePiece .model file; not needed for --format tokenized")
    parser.add_argument("--output-prefix", required=True, metavar="OUT",
                        help="writes OUT_tokens.bin/.idx, OUT_loss_mask.bin/.idx, "
                        "OUT_provenance.npy, OUT_summary.json (must not overlap an input)")
    parser.add_argument("--force", action="store_true",
                        help="replace a dataset already at OUT (atomically: the old one stays "
                        "until the new one is complete)")
    parser.add_argument("--seq-length", type=int, required=True, metavar="N",
                        help="training sequence length: longest conversation, pack size")
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS,
                        help="input format (default: detected per line)")
    parser.add_argument("--pack", action="store_true",
                        help="pack several conversations per sequence (never split one)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenizer processes (default: 1)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip and count bad lines instead of stopping at the first")
    parser.add_argument("--overlong", default="truncate", choices=OVERLONG,
                        help="conversations longer than --seq-length: cut or drop "
                        "(default: truncate)")


def _error(message: str) -> None:
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"eaft-megatron preprocess: error: {one_line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from ..paths import Interrupted, interruptible
    from . import pipeline
    from .errors import ConfigError
    from .workers import WorkerDied

    try:
        with interruptible():
            summary = pipeline.preprocess(
                args.input, output_prefix=args.output_prefix, seq_length=args.seq_length,
                tokenizer=args.tokenizer, fmt=args.format, pack=args.pack,
                workers=args.workers, skip_invalid=args.skip_invalid, overlong=args.overlong,
                force=args.force,
            )
    except (pipeline.PreprocessError, ConfigError, ValueError, FileNotFoundError) as e:
        _error(e)
        return 2
    except (WorkerDied, OSError) as e:
        _error(e)
        return 1
    except KeyboardInterrupt as e:
        why = e.name if isinstance(e, Interrupted) else "SIGINT"
        print(f"eaft-megatron preprocess: interrupted ({why}): temporary files removed, "
              "nothing written", file=sys.stderr, flush=True)
        return e.exit_code if isinstance(e, Interrupted) else 130
    s = summary
    print(f"{args.output_prefix}: {s['documents']} conversations in {s['sequences']} sequences "
          f"of <= {s['seq_length']} tokens ({s['pack_fill']:.1%} filled), {s['tokens']} tokens, "
          f"{s['supervised_tokens']} supervised; truncated {s['truncated']}, dropped "
          f"{s['dropped_overlong']}, skipped {s['skipped']}; {s['elapsed_s']:.1f}s")
    print(f"summary: {args.output_prefix}_summary.json")
    return 0


def register_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``preprocess`` to the ``eaft-megatron`` command."""
    parser = subparsers.add_parser(
        "preprocess", help="tokenize chat JSONL into a Megatron indexed dataset",
        description="Tokenize chat JSONL (messages / ShareGPT / Alpaca / text / tokenized) into "
        "Megatron-Core indexed datasets of tokens and assistant-only loss masks.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
