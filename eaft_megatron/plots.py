"""The pictures: the entropy-probability landscape (the trainer's ``--eaft-landscape``) and the
training curves of ``metrics.jsonl`` (the demo), and the ``eaft-megatron landscape`` command.

    eaft-megatron landscape DIR [DIR2] [--out X.png]

matplotlib (and numpy) are imported when a picture is drawn, never at import: the command's
parser stays light. Without matplotlib, :func:`have_matplotlib` is False and no picture is made.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_plot_arguments", "have_matplotlib", "load_record", "plot_curves",
           "plot_landscapes", "run_plot"]


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _title(record: dict) -> str:
    model = Path(record["model"]).parent.name if Path(record["model"]).name == "hf" else \
        Path(record["model"]).name
    return (f"{model} on {Path(record['data']).name} @ iteration {record['iteration']}\n"
            f"{record['tokens']} tokens, confident conflicts "
            f"{100 * record['confident_conflicts']:.2f}%")


def plot_landscapes(records: list[dict], out: Any, *, fmt: str | None = None) -> None:
    """One panel per landscape record (two: side by side, same colour scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    import numpy as np

    n = len(records)
    fig = plt.figure(figsize=(5.6 * n, 5.6))
    vmax = max(max(max(r) for r in rec["counts"]) for rec in records) or 1
    outer = fig.add_gridspec(1, n, wspace=0.35)
    for k, rec in enumerate(records):
        counts = np.asarray(rec["counts"], dtype=float)
        bins = rec["bins"]
        g = outer[k].subgridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4),
                                 wspace=0.05, hspace=0.05)
        ax = fig.add_subplot(g[1, 0])
        top = fig.add_subplot(g[0, 0], sharex=ax)
        right = fig.add_subplot(g[1, 1], sharey=ax)
        image = ax.imshow(np.where(counts > 0, counts, np.nan), origin="lower",
                          extent=(0, 1, 0, 1), aspect="auto", cmap="viridis",
                          norm=LogNorm(vmin=1, vmax=vmax))
        te, tp = rec["thresholds"]["entropy"], rec["thresholds"]["prob"]
        ax.add_patch(Rectangle((0, 0), tp, te, fill=False, edgecolor="red", linewidth=2))
        q = rec["quadrants"]["confident_conflict"]
        ax.text(min(tp, 0.98), min(te, 0.98), f" conflicts\n {100 * q['share']:.2f}%",
                color="red", va="bottom", ha="left", fontsize=8)
        ax.set_xlabel("p(label)")
        ax.set_ylabel("normalised entropy  min(H / ln K, 1)")
        edges = np.linspace(0, 1, bins + 1)
        top.bar(edges[:-1], counts.sum(axis=0), width=1 / bins, align="edge", color="gray")
        right.barh(edges[:-1], counts.sum(axis=1), height=1 / bins, align="edge", color="gray")
        top.set_yscale("log")
        right.set_xscale("log")
        top.tick_params(labelbottom=False)
        right.tick_params(labelleft=False)
        top.set_title(_title(rec), fontsize=9)
        fig.colorbar(image, ax=right, fraction=0.5, label="tokens")
    fig.savefig(out, dpi=80, format=fmt, bbox_inches="tight")
    plt.close(fig)


_RECORD_KEYS = ("bins", "counts", "thresholds", "quadrants", "iteration", "tokens",
                "confident_conflicts", "model", "data")


def load_record(path: str | os.PathLike) -> dict:
    """The landscape record in ``path`` (a ``--eaft-landscape`` directory, or its
    ``landscape.json``); ``ValueError`` with one line naming the path when there is none."""
    given = path
    path = Path(path)
    written_by = "written by the trainer's --eaft-landscape DIR"
    if path.is_dir():
        path = path / "landscape.json"
        if not path.is_file():
            raise ValueError(f"{given}: no landscape.json in this directory ({written_by}, at "
                             f"its evaluations)")
    elif not path.exists():
        raise ValueError(f"{given}: no such directory or file (a landscape directory, "
                         f"{written_by}, or its landscape.json)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as a landscape record "
                         f"({getattr(e, 'strerror', None) or e})") from None
    missing = [k for k in _RECORD_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise ValueError(f"{path}: not a landscape record ({written_by}): missing "
                         f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    return record


def add_plot_arguments(parser: Any) -> None:
    parser.add_argument("directories", nargs="+", metavar="DIR",
                        help="one or two landscape directories (or landscape.json files)")
    parser.add_argument("--out", default=None,
                        help="output PNG (default: DIR/landscape.png for one, "
                             "DIR2/comparison.png for two)")


def run_plot(args: Any) -> int:
    def error(message: str) -> int:
        print(f"eaft-megatron landscape: error: {message}", file=sys.stderr)
        return 2

    if len(args.directories) > 2:
        return error(f"give one or two landscape directories, got {len(args.directories)}")
    try:
        records = [load_record(d) for d in args.directories]
    except ValueError as e:
        return error(str(e))
    last = Path(args.directories[-1])
    last = last if last.is_dir() else last.parent
    out = args.out or str(last / ("landscape.png" if len(records) == 1 else "comparison.png"))
    if not Path(out).resolve().parent.is_dir():
        return error(f"--out {out}: no directory {Path(out).parent} to write it in")
    if not have_matplotlib():
        return error("drawing needs matplotlib: pip install matplotlib")
    plot_landscapes(records, out)
    for d, r in zip(args.directories, records):
        print(f"{d}: iteration {r['iteration']}, {r['tokens']} tokens, confident conflicts "
              f"{100 * r['confident_conflicts']:.2f}%")
    print(f"-> {out}")
    return 0


def plot_curves(records: list[dict], out: Path, title: str) -> Path | None:
    """``curves.png``: training and validation lm loss, the optimised loss, gate weight."""
    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train" and r.get("lm_loss") is not None]
    valid = [r for r in records if r.get("kind") == "valid" and not r.get("final")]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot([r["iteration"] for r in train], [r["lm_loss"] for r in train], label="train lm loss")
    ax.plot([r["iteration"] for r in train], [r["loss"] for r in train],
            label=f"train {train[0]['loss_type'] if train else ''} loss (optimised)")
    if valid:
        ax.plot([r["iteration"] for r in valid], [r["lm_loss"] for r in valid], "o-",
                label="validation lm loss (held-out)")
    ax.set_xlabel("iteration"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    gates = [r for r in train if r.get("gate_weight") is not None]
    bx.plot([r["iteration"] for r in gates], [r["gate_weight"] for r in gates],
            label="mean gate weight")
    bx.set_xlabel("iteration"), bx.set_ylim(0, 1.05), bx.legend(), bx.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
