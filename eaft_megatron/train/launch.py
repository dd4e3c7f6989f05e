"""``eaft-megatron train``: torchrun with the trainer's exit status and one-line errors.

``torchrun ... -m eaft_megatron.train`` exits 1 whenever a worker fails and prints its own report
(a ~40-line ``ChildFailedError`` traceback of the launcher), whatever the worker said: a mistake
the worker reports in one line with exit 2 reaches the shell as status 1 under a traceback.
This launcher runs ``torch.distributed.run`` in this process on the same command line
(``eaft-megatron train [LAUNCHER OPTIONS] [--] TRAINER FLAGS``, launcher options first) and, when
workers fail, prints one line instead of torchrun's report and exits with the worker's status:

- a trainer mistake or stop (the workers' ``eaft_megatron.train: error: ...`` line, read from
  torchrun's per-worker error file, where :func:`eaft_megatron.train.main._report` writes it):
  that line, once, and its status (2 for a mistake, 3 for a divergence);
- a worker that crashed (a Python traceback, printed above by the worker) or was killed by a
  signal: ``eaft-megatron train: rank R (pid P) exited with status S`` / ``was killed by SIGKILL``
  and status S / 128 + signal. Of several failed workers one is reported (:func:`_precedence`).

Workers launched this way (``EAFT_MEGATRON_LAUNCHER`` in their environment) leave the printing
of their error line to the launcher, so it appears once even when torchrun stops rank 0 before
rank 0 gets to print it.

:func:`torchrun_command` is the command that the package's own launches of the trainer (the
demo's, the GPU acceptance benchmark's) put before torchrun's arguments: ``$EAFT_TORCHRUN``
(shlex-split; a site's wrapper) when set, otherwise ``<this python> -m torch.distributed.run``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import tempfile

__all__ = ["LAUNCHER_ENV", "TORCHRUN_ENV", "launcher_parser", "main", "split_argv",
           "torchrun_command"]

LAUNCHER_ENV = "EAFT_MEGATRON_LAUNCHER"
#: a command used instead of ``<this python> -m torch.distributed.run`` (see the module doc)
TORCHRUN_ENV = "EAFT_TORCHRUN"
PROG = "eaft-megatron train"
_TRAINER_LINE = "eaft_megatron.train: error: "

# torchrun's options this launcher passes on (name -> takes a value); anything else starts the
# trainer's flags (torchrun's --log-dir, for one, would shadow the trainer's own --log-dir).
_OPTIONS = {
    "--nproc-per-node": True, "--nnodes": True, "--node-rank": True, "--master-addr": True,
    "--master-port": True, "--rdzv-backend": True, "--rdzv-endpoint": True, "--rdzv-id": True,
    "--rdzv-conf": True, "--max-restarts": True, "--standalone": False,
}
_ALIASES = {name.replace("-", "_").replace("__", "--", 1): name for name in _OPTIONS}


def torchrun_command() -> list[str]:
    """What launches the trainer's ranks, before torchrun's arguments (``--nproc-per-node N
    --master-addr A --master-port P -m eaft_megatron.train FLAGS``): ``$EAFT_TORCHRUN`` split
    like a shell command line when set, otherwise this interpreter's ``torch.distributed.run``.
    A value that does not split (an open quote) raises ``ValueError`` naming the variable."""
    custom = os.environ.get(TORCHRUN_ENV, "").strip()
    if not custom:
        return [sys.executable, "-m", "torch.distributed.run"]
    try:
        return shlex.split(custom)
    except ValueError as e:
        raise ValueError(f"{TORCHRUN_ENV}={custom!r}: {e}") from None


def launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        usage=f"{PROG} [--nproc-per-node N] [torchrun options] [--] TRAINER FLAGS",
        description="Launch the trainer (python -m eaft_megatron.train) under torchrun, run in "
        "this process. On failure: the workers' one-line error instead of torchrun's report, "
        "and the workers' exit status (2: a mistake; 3: a divergence) instead of torchrun's 1. "
        "Launcher options come first; the first other flag (or --) starts the trainer's "
        "flags, listed by `python -m eaft_megatron.train --help`.")
    parser.add_argument("--nproc-per-node", default="1", metavar="N",
                        help="processes on this node (torchrun's: a number, gpu, cpu or auto; "
                             "default: 1)")
    parser.add_argument("--nnodes", default="1", metavar="N", help="nodes, or MIN:MAX (default: 1)")
    parser.add_argument("--node-rank", type=int, default=0, metavar="R",
                        help="this node's rank with the static rendezvous (default: 0)")
    parser.add_argument("--master-addr", default=None,
                        help="address of the node of rank 0 (static rendezvous)")
    parser.add_argument("--master-port", type=int, default=None,
                        help="its port (default on one node: a free port)")
    parser.add_argument("--rdzv-backend", default=None, help="torchrun's, e.g. c10d")
    parser.add_argument("--rdzv-endpoint", default=None, help="torchrun's, HOST:PORT")
    parser.add_argument("--rdzv-id", default=None, help="torchrun's job id")
    parser.add_argument("--rdzv-conf", default=None, help="torchrun's, KEY=VALUE,...")
    parser.add_argument("--max-restarts", type=int, default=None,
                        help="torchrun's worker-group restarts (default: 0)")
    parser.add_argument("--standalone", action="store_true",
                        help="torchrun's single-node rendezvous on a free port")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """``argv`` -> (launcher options, trainer flags): the leading options of :data:`_OPTIONS`
    (either spelling, ``--x V`` or ``--x=V``), then everything after them or after ``--``.
    None when ``-h`` / ``--help`` comes among the launcher options."""
    i = 0
    launcher: list[str] = []
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return launcher, argv[i + 1:]
        if arg in ("-h", "--help"):
            return None
        name, eq, value = arg.partition("=")
        name = _ALIASES.get(name, name)
        if name not in _OPTIONS:
            break
        if _OPTIONS[name] and not eq:
            launcher += [name, *argv[i + 1:i + 2]]
            i += 2
        else:
            launcher.append(f"{name}={value}" if eq else name)
            i += 1
    return launcher, argv[i:]


class _QuietFailures(logging.Filter):
    """Drop torchrun's own log lines about failed and stopped workers (this launcher reports
    the failure itself); its other messages stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("failed (exitcode") or msg.startswith("Sending process"))


def _trainer_line(failure) -> str | None:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message")
    if isinstance(message, str) and message.startswith(_TRAINER_LINE):
        return message
    return None


def _precedence(item) -> tuple:
    """Which failed worker to report (smallest first): one that exited with the trainer's line
    (a rank torchrun stopped may have written it too, then exited -15); one killed from outside
    (``kill -9``, the OOM killer); one that crashed; last one stopped by torchrun's SIGTERM."""
    rank, f = item
    if _trainer_line(f) is not None:
        kind = 0 if f.exitcode > 0 else 1
    elif f.exitcode < 0 and -f.exitcode not in (signal.SIGTERM, signal.SIGINT):
        kind = 2
    else:
        kind = 3 if f.exitcode > 0 else 4
    return kind, f.timestamp, rank


def _report(failures: dict) -> int:
    """One line for the workers' failure (see the module doc); returns the exit status."""
    rank, first = min(failures.items(), key=_precedence)
    line = _trainer_line(first)
    if line is not None:
        print(line, file=sys.stderr, flush=True)
        return first.exitcode if first.exitcode > 0 else 1
    if first.exitcode > 0:
        print(f"{PROG}: rank {rank} (pid {first.pid}) exited with status {first.exitcode} "
              f"(its error is printed above)", file=sys.stderr, flush=True)
        return first.exitcode
    print(f"{PROG}: rank {rank} (pid {first.pid}) was killed by {first.signal_name()}",
          file=sys.stderr, flush=True)
    return 128 - first.exitcode


def main(argv: list[str]) -> int:
    split = split_argv(argv)
    parser = launcher_parser()
    if split is None:
        parser.print_help()
        return 0
    launcher, trainer = split
    parser.parse_args(launcher)  # a wrong launcher option: argparse's line, exit 2
    if not trainer:
        parser.error("no trainer flags given (see python -m eaft_megatron.train --help)")

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        _QuietFailures())
    os.environ[LAUNCHER_ENV] = "1"  # the workers leave their error line to this process
    args = torchrun.parse_args([*launcher, "-m", "eaft_megatron.train", *trainer])
    # torchrun makes a log directory per launch (tempfile.mkdtemp("torchelastic_"), empty
    # unless output is redirected) and leaves it: one /tmp/torchelastic_* per launch, for good.
    # Here it is made inside a directory of ours, removed afterwards (logs asked for stay).
    scratch = tempfile.mkdtemp(prefix="eaft-torchrun-")
    previous, tempfile.tempdir = tempfile.tempdir, scratch  # (this process only, not the workers)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        return _report(e.failures)
    except SignalException as e:
        print(f"{PROG}: interrupted ({e.sigval.name}): workers stopped", file=sys.stderr,
              flush=True)
        return 128 + int(e.sigval)
    finally:
        tempfile.tempdir = previous
        _remove_scratch(scratch)
    return 0


def _remove_scratch(root: str) -> None:
    """``root`` and what torchrun left in it: the workers' ``error.json`` records (already
    reported) and the directories that then hold nothing; redirected logs (``--redirects``,
    ``--tee``) stay."""
    for path, _, files in os.walk(root, topdown=False):
        for name in files:
            if name == "error.json":
                os.unlink(os.path.join(path, name))
        try:
            os.rmdir(path)
        except OSError:
            pass  # something else in it
