"""``--export-hf DIR``: a Hugging Face checkpoint of the final weights when training ends.

After the last checkpoint is saved (the end of training, or an ``--exit-signal-handler`` /
``--exit-interval`` / ``--exit-duration-in-mins`` exit, which save before exiting), the ranks
leave their process groups, every rank but 0 exits, and rank 0 runs ``eaft-megatron convert
megatron-to-hf --megatron SAVE --iteration LAST --out DIR --nproc N`` in a child process: the
export is that command's output, bit for bit (same code, same files), written atomically
through :mod:`eaft_megatron.paths` (an owner-named temporary renamed at the end; an earlier
export is replaced only once the new one is complete). ``N`` (``--export-hf-nproc``) defaults
to the node's ranks (``LOCAL_WORLD_SIZE``): N converter processes in parallel, each holding
about 1/N of the model, in place of the training processes that just exited.

``SAVE/hf_exports.json`` records the directories this run exported to and the iteration each
holds (``null`` while an export is being written). It makes a non-empty DIR recognisable as
an earlier export of this run (replaced), and a rerun of a finished run skips an export that is
already there for the final iteration (nothing rewritten) and writes one that is missing or
older. The pre-flight (:func:`check_export_dir`) refuses in one line: ``--export-hf`` without
``--save`` or with ``--eval-only``, DIR overlapping ``--save`` or the run's inputs, DIR a file,
and DIR non-empty and not an earlier export of this run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .flags import TrainArgError, flag_value

__all__ = ["RECORD", "add_export_args", "check_export_dir", "export_final", "is_own_export"]

RECORD = "hf_exports.json"
# torchrun's variables: the converter is a one-process job of its own
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR",
                 "MASTER_PORT")


def add_export_args(group) -> None:
    group.add_argument("--export-hf", default=None, metavar="DIR",
                       help="at the end of training (also on --exit-signal-handler exits), write "
                            "a Hugging Face checkpoint of the final weights to DIR (what "
                            "`eaft-megatron convert megatron-to-hf` of the last checkpoint "
                            "writes); needs --save")
    group.add_argument("--export-hf-nproc", type=int, default=None, metavar="N",
                       help="processes that share the export (`megatron-to-hf --nproc N`: each "
                            "reads and writes about 1/N of the model, same files as N=1); "
                            "default: this node's ranks (LOCAL_WORLD_SIZE), whose training "
                            "processes have exited by then")


def _exports(save: str | os.PathLike) -> dict[str, int | None]:
    try:
        return dict(json.loads((Path(save) / RECORD).read_text()).get("exports", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _record(save: str | os.PathLike, out: Path, iteration: int | None) -> None:
    from ..paths import atomic_output

    exports = _exports(save)
    exports[str(out)] = iteration
    with atomic_output(Path(save) / RECORD, directory=False, force=True) as tmp:
        tmp.write_text(json.dumps({"exports": exports}, indent=2, sort_keys=True) + "\n")


def is_own_export(save: str | os.PathLike, out: str | os.PathLike) -> bool:
    """Whether ``out`` is an earlier export of the run in ``save`` (recorded there, and a HF
    directory)."""
    resolved = Path(out).resolve()
    return str(resolved) in _exports(save) and (resolved / "config.json").is_file()


def check_export_dir(argv: list[str]) -> None:
    """The pre-flight of ``--export-hf DIR`` (see the module doc); raises TrainArgError."""
    from ..paths import overlaps

    out = flag_value(argv, "--export-hf")
    nproc = flag_value(argv, "--export-hf-nproc")
    if nproc is not None and not (nproc.isdigit() and int(nproc) >= 1):
        raise TrainArgError(f"--export-hf-nproc {nproc}: give a number of processes >= 1")
    if out is None:
        return
    save = flag_value(argv, "--save")
    if save is None or "--skip-train" in argv:
        raise TrainArgError(f"--export-hf {out} exports the final checkpoint of training: it "
                            f"needs --save (and training, not --eval-only / --skip-train)")
    for flag in ("--save", "--load", "--pretrained-checkpoint", "--hf-config"):
        value = flag_value(argv, flag)
        if value is not None and overlaps(out, value):
            raise TrainArgError(f"--export-hf {out} overlaps {flag} {value}: export to a "
                                f"directory outside the run's checkpoints and inputs")
    resolved = Path(out).resolve()
    if resolved.exists() and not resolved.is_dir():
        raise TrainArgError(f"--export-hf {out} exists and is not a directory")
    if resolved.is_dir() and any(resolved.iterdir()) and not is_own_export(save, resolved):
        raise TrainArgError(f"--export-hf {out} exists, is not empty and is not an earlier "
                            f"export of this run ({Path(save) / RECORD}): choose a new or empty "
                            f"directory")


def export_final(save: str, out: str, nproc: int | None = None) -> int:
    """Rank 0, after the last checkpoint is saved and the process groups are gone: export the
    latest checkpoint of ``save`` to ``out`` with ``nproc`` converter processes (default: this
    node's ranks; nothing when ``out`` already holds that iteration's export); returns the exit
    code (the converter's own one-line message on failure)."""
    from ..checkpoint import read_tracker

    iteration = read_tracker(save)
    nproc = nproc or int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    resolved = Path(out).resolve()
    if not isinstance(iteration, int):
        print(f"eaft_megatron.train: error: --export-hf {out}: no checkpoint in {save} to "
              f"export", file=sys.stderr, flush=True)
        return 2
    own = is_own_export(save, resolved)
    if own and _exports(save).get(str(resolved)) == iteration:
        print(f"> eaft_megatron.train: --export-hf {out} already holds iteration {iteration}; "
              f"nothing to export", flush=True)
        return 0
    _record(save, resolved, None)  # an export of this run is being written there
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_ENV and not k.startswith("TORCHELASTIC_")}
    cmd = [sys.executable, "-m", "eaft_megatron", "convert", "megatron-to-hf", "--megatron",
           str(save), "--iteration", str(iteration), "--out", str(resolved),
           "--nproc", str(nproc), *(["--force"] if own else [])]
    print(f"> eaft_megatron.train: exporting iteration {iteration} to {out} (Hugging Face, "
          f"{nproc} process{'es' if nproc > 1 else ''})", flush=True)
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        print(f"eaft_megatron.train: error: --export-hf {out}: the export of iteration "
              f"{iteration} failed (exit {code}); the checkpoint in {save} is intact: rerun the "
              f"same command, or `eaft-megatron convert megatron-to-hf --megatron {save}`",
              file=sys.stderr, flush=True)
        return code
    _record(save, resolved, iteration)
    return 0
