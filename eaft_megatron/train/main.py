"""``python -m eaft_megatron.train``: Megatron-LM's ``pretrain`` with the EAFT loss.

See the package docstring for command lines. Steps: complete the command line
(:mod:`.argv`), parse and validate it with Megatron-LM's parser (plus EAFT and trainer flags),
set up CPU execution when there is no GPU (:mod:`eaft_megatron.compat.cpu`), store the HF
config next to the checkpoints, hook ``metrics.jsonl``, then hand over to
``megatron.training.pretrain``.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

__all__ = ["add_train_args", "main"]


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The EAFT group (:func:`eaft_megatron.megatron.add_eaft_args`) plus the trainer's own flags
    in it: ``--hf-config``, ``--log-dir``."""
    from ..megatron import add_eaft_args

    add_eaft_args(parser)
    group = next(g for g in parser._action_groups if g.title and g.title.startswith("EAFT"))
    group.add_argument("--hf-config", default=None,
                       help="HF config directory describing the model (default: the hf/ "
                            "directory stored with the checkpoint)")
    group.add_argument("--log-dir", default=None,
                       help="where metrics.jsonl goes (default: --save; none without either)")
    group.add_argument("--eaft-trust-checkpoint", action="store_true",
                       help="load --load's pickled entries (args, RNG, optimizer, _extra_state) "
                            "without the allow-list: allows arbitrary code execution; only for "
                            "checkpoints you made yourself")
    from .export import add_export_args
    from .landscape import add_landscape_args
    from .lock import add_lock_args

    add_export_args(group)
    add_landscape_args(group)
    add_lock_args(group)
    return parser


def _escape_bare_percent(text: str) -> str:
    """``%`` not starting ``%%`` or ``%(name)`` doubled, so argparse can format the help (a
    megatron-core 0.19.2 help string has one); correct strings are returned unchanged."""
    import re

    return re.sub(r"%%|%\(|%", lambda m: m.group(0) if m.group(0) != "%" else "%%", text)


def help_parser() -> argparse.ArgumentParser:
    """Megatron-LM's parser with the EAFT group first, its help strings made printable."""
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(
        prog="torchrun [--nproc-per-node N] -m eaft_megatron.train",
        description="SFT with EAFT in Megatron-LM's own training loop. The architecture comes "
        "from the checkpoint's hf/ config (or --hf-config); restart idiom: --load RUN --save RUN "
        "--pretrained-checkpoint CKPT (a rerun resumes RUN's latest complete checkpoint). "
        "Every other flag is Megatron-LM's.", allow_abbrev=False,
        usage="%(prog)s [EAFT flags] [Megatron-LM flags]")
    add_train_args(parser)
    eaft = next(g for g in parser._action_groups if g.title and g.title.startswith("EAFT"))
    for action in eaft._group_actions:  # the EAFT flags show their defaults
        if action.default not in (None, False, argparse.SUPPRESS) and isinstance(
                action.help, str) and "default" not in action.help:
            action.help += " (default: %(default)s)"
    add_megatron_arguments(parser)
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = _escape_bare_percent(action.help)
    return parser


def _padded_vocab(args: Any, hf_config: Any) -> int:
    """The checkpoint's padded vocabulary (its embedding rows), else Megatron's padding rule."""
    from ..models import padded_vocab_size

    from ..checkpoint import TRACKER, checkpoint_tensor_shapes, find_iteration_dir

    root = args.load or getattr(args, "pretrained_checkpoint", None)
    if root and (Path(root) / TRACKER).is_file():

        step = getattr(args, "ckpt_step", None)
        shapes = checkpoint_tensor_shapes(find_iteration_dir(root, step if not args.finetune
                                                             else None))
        entry = shapes.get("embedding.word_embeddings.weight")
        if entry is not None:
            return int(entry[0][0])
    return padded_vocab_size(hf_config.vocab_size, args.tensor_model_parallel_size,
                             args.make_vocab_size_divisible_by)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _error(message: str, code: int = 2) -> int:
    """One line on rank 0 (every rank exits with ``code``); under torchrun also the reason in
    its failure report (:func:`_report`). The other ranks exit a moment later: torchrun stops
    every worker as soon as one exits, and rank 0, slower to reach the same check on a loaded
    machine, was stopped before printing the line (seen with two test files run at once)."""
    _report(message, here=_rank() == 0)
    if _rank() != 0:
        import time

        time.sleep(_PEER_EXIT_DELAY_S)
    return code


_PEER_EXIT_DELAY_S = 3.0


def _report(message: str, *, here: bool) -> None:
    """The line ``eaft_megatron.train: error: MESSAGE``: into torchrun's error file
    (:func:`_tell_torchrun`), and on stderr when ``here``, unless ``eaft-megatron train``
    launched this worker and the error file holds it: that launcher prints it once."""
    from .launch import LAUNCHER_ENV

    written = _tell_torchrun(message)
    if here and not (written and os.environ.get(LAUNCHER_ENV)):
        print(f"eaft_megatron.train: error: {message}", file=sys.stderr, flush=True)


def _tell_torchrun(message: str) -> bool:
    """The reason a worker stops, as torchrun's failure report shows it: torchrun exits 1
    whenever a worker fails (its own exit code cannot be chosen) and prints a report with a
    ``traceback :`` field per failed rank; without an error file that field only says "To
    enable traceback see ...". Written to ``TORCHELASTIC_ERROR_FILE`` in the format of
    ``torch.distributed.elastic``'s ``record`` decorator, so the field is this one line."""
    import json
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    line = f"eaft_megatron.train: error: {message}"
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                       "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        return False
    return True


def _parse_megatron_args(full_argv: list[str]) -> Any:
    """Megatron-LM's parse + validation; its argparse and assertion failures become one line
    on rank 0 (exit 2) instead of a traceback per rank."""
    import contextlib
    import io
    import traceback

    from megatron.training.arguments import parse_and_validate_args

    sys.argv = [sys.argv[0], *full_argv]  # Megatron's parser reads sys.argv
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse_and_validate_args(extra_args_provider=add_train_args)
    except SystemExit as e:
        lines = [x for x in captured.getvalue().splitlines() if x.strip()]
        raise _ArgsRejected(lines[-1] if lines else f"argument parsing failed ({e.code})") from None
    except AssertionError as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        text = str(e) or (where.line or "").strip()
        raise _ArgsRejected(f"Megatron-LM rejected the arguments: {text} "
                            f"({Path(where.filename).name}:{where.lineno})") from None
    finally:
        if _rank() == 0:
            sys.stderr.write(captured.getvalue())


class _ArgsRejected(Exception):
    pass


def wants_help(argv: list[str]) -> bool:
    return "-h" in argv or "--help" in argv


def _help_cache_file() -> Path | None:
    """Where ``--help``'s text is kept between calls: ``$XDG_CACHE_HOME/eaft-megatron`` (default
    ``~/.cache``), named by a hash of everything the text depends on: the size and mtime of
    the modules that define the flags (``train/``, ``megatron/``) and of Megatron-LM's
    ``arguments.py`` / ``package_info.py``
    (found without importing megatron), the Python version, the terminal width argparse formats
    to, ``WORLD_SIZE`` (a default of Megatron's). None when megatron cannot be located."""
    import hashlib
    import importlib.util
    import shutil

    try:
        spec = importlib.util.find_spec("megatron")
    except (ImportError, ValueError):
        return None
    roots = list(spec.submodule_search_locations or []) if spec else []
    if not roots:
        return None
    files = [Path(roots[0]) / "training" / "arguments.py",
             Path(roots[0]) / "core" / "package_info.py",
             *sorted(p for sub in ("train", "megatron")  # where the flags are defined
                     for p in (Path(__file__).resolve().parents[1] / sub).glob("*.py"))]
    key = [sys.version, str(shutil.get_terminal_size().columns),
           os.environ.get("WORLD_SIZE", "1")]
    for f in files:
        try:
            st = f.stat()
        except OSError:
            return None
        key.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:20]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "eaft-megatron" / f"train-help-{digest}.txt"


def cached_help() -> str | None:
    """``--help``'s text when an earlier call left it for this installation, else None."""
    path = _help_cache_file()
    try:
        return path.read_text() if path is not None else None
    except OSError:
        return None


def help_text() -> str:
    """The trainer's ``--help`` (:func:`help_parser`): from the cache (:func:`cached_help`), or
    formatted (~4 CPU seconds: Megatron-LM's import) and stored for the next call (atomically,
    replacing older versions; a cache that cannot be written is skipped)."""
    text = cached_help()
    if text is not None:
        return text
    import warnings

    with warnings.catch_warnings():  # megatron's "Apex is not installed" notices
        warnings.simplefilter("ignore")
        text = help_parser().format_help()
    path = _help_cache_file()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
            for old in path.parent.glob("train-help-*.txt"):
                if old != path:
                    old.unlink(missing_ok=True)
        except OSError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        sys.stdout.write(help_text())
        return 0

    import torch

    from ..models import te_available
    from .argv import TrainArgError, complete_argv

    cpu = not torch.cuda.is_available()
    if cpu:
        from ..compat import install_cpu_compat

        install_cpu_compat()
    try:
        full_argv, info = complete_argv(argv, cpu=cpu, te_available=(not cpu) and te_available())
    except (TrainArgError, ValueError, OSError) as e:
        return _error(str(e))
    from .lock import LockError, take_run_lock

    try:
        take_run_lock(argv)  # one job per --save (rank 0; released at exit)
    except (LockError, OSError) as e:
        return _error(str(e))

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from .guard import RunStopped, install_guard
    from .metrics import MetricsLog, install_metrics_hooks
    from .steps import datasets_provider, forward_step, model_provider

    try:
        args = _parse_megatron_args(full_argv)
    except _ArgsRejected as e:
        return _error(str(e))
    if not args.calculate_per_token_loss:
        return _error("eaft_megatron.train needs --calculate-per-token-loss")
    from ..compat.processes import contain_child_processes

    contain_child_processes(async_save=bool(getattr(args, "async_save", False)))  # no orphans
    start = info.start
    if start.resumed and args.train_iters and start.iteration >= args.train_iters:
        if args.rank == 0:
            print(f"> eaft_megatron.train: {start.note}: iteration {start.iteration} >= "
                  f"--train-iters {args.train_iters}, the run is complete; nothing to do",
                  flush=True)
        return _export(args)  # unless its export is missing or older
    args.padded_vocab_size = _padded_vocab(args, info.hf_config)
    if cpu:
        from ..compat import setup_cpu_training

        setup_cpu_training(args)
    else:
        from ..compat import skip_helper_build

        skip_helper_build()
    if args.save and args.rank == 0:
        os.makedirs(args.save, exist_ok=True)
        from ..checkpoint import store_hf_dir

        extra = None
        if start.hf is not None:  # HF tensors the model does not hold, kept for export
            from .hf_load import extra_tensors_writer

            extra = extra_tensors_writer(Path(start.hf), info.hf_config)
        store_hf_dir(info.hf_dir, args.save, extra)  # the checkpoint describes itself
    log_dir = args.log_dir or args.save
    log = MetricsLog(log_dir, enabled=args.rank == args.world_size - 1, loss_type=args.loss_type)
    install_metrics_hooks(log)
    if args.eaft_landscape:
        from .landscape import Landscape, check_landscape_args, install_landscape_hooks

        problem = check_landscape_args(args)
        if problem:
            return _error(problem)
        install_landscape_hooks(Landscape(args, hf_dir=str(info.hf_dir)))
    install_guard()
    from ..compat.optimizer import install_optimizer_fixes

    install_optimizer_fixes()  # --use-distributed-optimizer resumes without TE/apex
    log.on_start(resumed=start.iteration > 0, iteration=start.iteration,
                 checkpoint=start.load or start.hf, finetune=start.finetune)
    if args.rank == 0:
        print(f"> eaft_megatron.train: {start.note}", flush=True)
        print(f"> eaft_megatron.train: model from {info.hf_dir}, loss {args.loss_type}, "
              f"{'CPU (gloo)' if cpu else 'GPU'}, padded vocab {args.padded_vocab_size}, "
              f"metrics -> {os.path.join(log_dir, 'metrics.jsonl') if log_dir else 'none'}; "
              f"added flags: {' '.join(info.added)}", flush=True)

    import warnings

    with warnings.catch_warnings():  # "use a ModelConfig": we deliberately use a provider
        warnings.simplefilter("ignore", UserWarning)
        config = pretrain_cfg_container_from_args(args)
    from ..checkpoint.safe_load import refusal, safe_checkpoint_loading

    try:
        with safe_checkpoint_loading(enabled=not args.eaft_trust_checkpoint):
            pretrain(config, datasets_provider, ModelType.encoder_or_decoder, forward_step,
                     model_provider=partial(model_provider, info.hf_config,
                                            hf_weights=start.hf),
                     skip_model_parallel_init=cpu)
    except RunStopped as e:
        _report(str(e), here=e.report)
        return e.code
    except SystemExit as e:  # --exit-signal-handler / --exit-interval: saved, then sys.exit
        if refusal() is not None:
            _report(str(refusal()), here=True)
            return 2
        if e.code not in (None, 0):
            raise
    except BaseException:  # torch's CheckpointException is a BaseException
        if refusal() is None:
            raise
        _report(str(refusal()), here=True)
        return 2
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's part of the last checkpoint is written
        torch.distributed.destroy_process_group()
    return _export(args)  # the last checkpoint is complete: --export-hf


def _export(args: Any) -> int:
    """``--export-hf``: rank 0 exports the last checkpoint (:mod:`.export`); 0 elsewhere."""
    if not getattr(args, "export_hf", None) or args.rank != 0:
        return 0
    from .export import export_final

    return export_final(args.save, args.export_hf, getattr(args, "export_hf_nproc", None))
