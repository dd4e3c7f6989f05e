"""The entropy-probability landscape of a model on your data, from the evaluation's own loss pass.

    torchrun ... -m eaft_megatron.train --load CKPT --data-path P --eval-only --eaft-landscape DIR
    torchrun ... -m eaft_megatron.train ... --eaft-landscape DIR --eaft-landscape-interval 100
    python -m eaft_megatron.train.landscape plot DIR [DIR2] --out landscape.png
    eaft-megatron landscape DIR [DIR2] [--out X.png]

Every evaluated supervised token has a normalised entropy ``min(H / ln K, 1)`` (the gate's H,
top-K or full) and a label probability ``p(label)``; the loss op returns both, and the model's
most likely token, from the pass that computes the loss (:class:`EAFTTokenStats`). This module
counts them, per evaluation, into:

``landscape.json``  a ``bins x bins`` histogram (rows: entropy bins from 0 to 1, columns:
                    p(label) bins from 0 to 1; integer counts), the token count, the four
                    quadrants at ``--eaft-conflict-entropy`` / ``--eaft-conflict-prob`` (the
                    ``confident conflicts`` of ``metrics.jsonl``: low entropy AND low
                    probability), the iteration, model, checkpoint and data.
``samples.jsonl``   one line per evaluated conversation, most conflicting first: input file and
                    line (from ``preprocess``'s provenance), supervised tokens, confident
                    conflicts (count and share), mean gate weight; for the ``--eaft-landscape-top``
                    most conflicting ones, the conflicting positions decoded with the tokenizer in
                    ``<checkpoint>/hf``: the label, the model's most likely token, p(label), the
                    normalised entropy and the text before.
``landscape.png``   the histogram as a heatmap (log colour scale), the conflict quadrant
                    outlined, the marginal distributions (needs matplotlib).

With ``--eaft-landscape-interval N`` every evaluation at an iteration that is a multiple of N
(and the final one) writes ``DIR/iter_0000N00/``; ``DIR/`` itself holds the latest. Files are
written atomically by one rank (the last rank, which also writes ``metrics.jsonl``).

Cost and communication: each token is counted once (the statistics are replicated over the
tensor-parallel ranks, so only the last tensor-parallel rank of the last pipeline stage counts),
per micro-batch with a few vectorised operations on the statistics already computed; at the end
of an evaluation ONE collective, a ``gather`` over the data-parallel group of the last pipeline
stage of one fixed-size float64 buffer per rank (histogram, quadrant counts, per-conversation
sums, the conflicting positions: counts below 2**53 are exact in float64). Nothing else is
communicated. Context parallelism is not supported (the statistics are split over the sequence).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import iteration_dir_name

__all__ = ["Landscape", "add_landscape_args", "install_landscape_hooks", "plot_landscapes",
           "main"]

# per conversation: id, supervised tokens, confident conflicts, sum of gate weights,
# evaluations (times its tokens were counted: > 1 when an evaluation cycles over the data)
ROW = 5
# per conflicting position: conversation, position of the label token in the conversation,
# most likely token, p(label), normalised entropy
SLOT = 5
SLOTS_PER_CONVERSATION = 8
QUADRANTS = ("uncertain_likely", "uncertain_unlikely", "confident_agreement",
             "confident_conflict")  # index = 2 * (entropy low) + (probability low)


def add_landscape_args(group: Any) -> None:
    group.add_argument("--eaft-landscape", default=None, metavar="DIR",
                       help="write the entropy-probability landscape of the evaluated data "
                            "(landscape.json, samples.jsonl, landscape.png) into DIR at the final "
                            "evaluation (--eval-only: the only one)")
    group.add_argument("--eaft-landscape-interval", type=int, default=None, metavar="N",
                       help="also at every evaluation whose iteration is a multiple of N, into "
                            "DIR/iter_XXXXXXX/ (DIR holds the latest)")
    group.add_argument("--eaft-landscape-bins", type=int, default=20,
                       help="bins per axis of the histogram (default 20)")
    group.add_argument("--eaft-landscape-top", type=int, default=20,
                       help="decode the conflicting positions of this many most conflicting "
                            "conversations in samples.jsonl (default 20)")


def check_landscape_args(args: Any) -> str | None:
    """A one-line reason the landscape flags cannot work, or None."""
    if not getattr(args, "eaft_landscape", None):
        return None
    if args.eaft_landscape_bins < 1:
        return f"--eaft-landscape-bins must be >= 1, got {args.eaft_landscape_bins}"
    if args.eaft_landscape_interval is not None and args.eaft_landscape_interval < 1:
        return f"--eaft-landscape-interval must be >= 1, got {args.eaft_landscape_interval}"
    if getattr(args, "no_eaft_stats", False):
        return "--eaft-landscape needs the per-token statistics: drop --no-eaft-stats"
    if getattr(args, "context_parallel_size", 1) > 1:
        return "--eaft-landscape does not support --context-parallel-size > 1"
    return None


# -- per-rank accumulation ----------------------------------------------------------------------


@dataclass
class _Accumulator:
    bins: int
    top_k: int
    conflict_entropy: float
    conflict_prob: float
    hist: Any = None  # torch int64 [bins * bins] on the device
    quadrants: Any = None  # torch int64 [4]
    rows: list = field(default_factory=list)  # numpy [n, ROW]
    slots: list = field(default_factory=list)  # numpy [n, SLOT]

    def add(self, stats: Any, cu_seqlens: Any, first_conversation: Any) -> None:
        import torch

        b, s = cu_seqlens.shape[0], cu_seqlens.shape[1] - 1
        mask = stats.mask.reshape(b, s)
        entropy = torch.clamp(stats.entropy.reshape(b, s) / math.log(self.top_k), max=1.0)
        prob = stats.target_prob.reshape(b, s)
        device = mask.device
        cu = cu_seqlens.to(device=device, dtype=torch.int64).contiguous()
        positions = torch.arange(s, device=device).expand(b, s).contiguous()
        segment = torch.searchsorted(cu, positions, right=True) - 1  # [b, s]
        conversation = first_conversation.to(device).reshape(b, 1) + segment
        # the label at position i is the token i + 1 of the same conversation
        label_position = positions + 1 - cu.gather(1, segment)
        sel = mask.nonzero(as_tuple=True)
        e, p = entropy[sel], prob[sel]
        bins = self.bins
        cell = (torch.clamp((e * bins).long(), 0, bins - 1) * bins
                + torch.clamp((p * bins).long(), 0, bins - 1))
        hist = torch.bincount(cell, minlength=bins * bins)
        low_e, low_p = e < self.conflict_entropy, p < self.conflict_prob
        quadrants = torch.bincount(low_e.long() * 2 + low_p.long(), minlength=4)
        self.hist = hist if self.hist is None else self.hist + hist
        self.quadrants = quadrants if self.quadrants is None else self.quadrants + quadrants
        conflict = low_e & low_p
        conv = conversation[sel]
        ids, inverse = torch.unique(conv, return_inverse=True)
        sums = torch.stack([
            torch.bincount(inverse, minlength=ids.numel()).double(),
            torch.bincount(inverse, weights=conflict.double(), minlength=ids.numel()),
            torch.bincount(inverse, weights=stats.weight.reshape(b, s)[sel].double(),
                           minlength=ids.numel()),
        ], dim=1)
        rows = torch.cat([ids.double()[:, None], sums, torch.ones_like(sums[:, :1])], dim=1)
        self.rows.append(rows.cpu().numpy())
        if bool(conflict.any()):
            top = stats.top_token.reshape(b, s)[sel] if stats.top_token is not None else \
                torch.full_like(conv, -1)
            slots = torch.stack([conv.double(), label_position[sel].double(), top.double(),
                                 p.double(), e.double()], dim=1)[conflict]
            self.slots.append(slots.cpu().numpy())

    def buffer(self, capacity_rows: int) -> np.ndarray:
        """This rank's fixed-size float64 buffer: [2 + 4 + bins^2 | rows | slots]."""
        bins2 = self.bins * self.bins
        rows = _merge_rows(np.concatenate(self.rows) if self.rows else np.zeros((0, ROW)))
        slots = _best_slots(np.concatenate(self.slots) if self.slots else np.zeros((0, SLOT)))
        capacity_slots = capacity_rows * SLOTS_PER_CONVERSATION
        truncated = len(rows) > capacity_rows or len(slots) > capacity_slots
        rows, slots = rows[:capacity_rows], slots[:capacity_slots]
        out = np.zeros(6 + bins2 + capacity_rows * ROW + capacity_slots * SLOT)
        out[0], out[1] = len(rows), len(slots) + (0.5 if truncated else 0)
        if self.quadrants is not None:
            out[2:6] = self.quadrants.cpu().numpy()
            out[6:6 + bins2] = self.hist.cpu().numpy()
        o = 6 + bins2
        out[o:o + rows.size] = rows.reshape(-1)
        o += capacity_rows * ROW
        out[o:o + slots.size] = slots.reshape(-1)
        return out


def _merge_rows(rows: np.ndarray) -> np.ndarray:
    """Rows of the same conversation summed (a conversation seen in several micro-batches)."""
    if len(rows) == 0:
        return rows
    ids, inverse = np.unique(rows[:, 0], return_inverse=True)
    out = np.zeros((len(ids), ROW))
    out[:, 0] = ids
    for c in range(1, ROW):
        out[:, c] = np.bincount(inverse, weights=rows[:, c], minlength=len(ids))
    return out


def _best_slots(slots: np.ndarray) -> np.ndarray:
    """At most SLOTS_PER_CONVERSATION conflicting positions per conversation (distinct
    positions, lowest p(label) first)."""
    if len(slots) == 0:
        return slots
    order = np.lexsort((slots[:, 3], slots[:, 0]))  # by conversation, then p
    slots = slots[order]
    keep, count, seen = [], {}, set()
    for i, (conv, pos) in enumerate(slots[:, :2]):
        key = (conv, pos)
        if key in seen or count.get(conv, 0) >= SLOTS_PER_CONVERSATION:
            continue
        seen.add(key)
        count[conv] = count.get(conv, 0) + 1
        keep.append(i)
    return slots[keep]


def unpack_buffers(buffers: list[np.ndarray], bins: int, capacity_rows: int) -> dict:
    """The writer's merge of every rank's buffer: summed histogram and quadrants, rows merged
    per conversation, the best conflicting positions."""
    bins2 = bins * bins
    hist = np.zeros(bins2, dtype=np.int64)
    quadrants = np.zeros(4, dtype=np.int64)
    rows, slots, truncated = [], [], False
    for buf in buffers:
        n_rows, n_slots = int(buf[0]), int(buf[1])
        truncated |= buf[1] != n_slots
        quadrants += np.rint(buf[2:6]).astype(np.int64)
        hist += np.rint(buf[6:6 + bins2]).astype(np.int64)
        o = 6 + bins2
        rows.append(buf[o:o + n_rows * ROW].reshape(-1, ROW))
        o += capacity_rows * ROW
        slots.append(buf[o:o + n_slots * SLOT].reshape(-1, SLOT))
    return dict(hist=hist.reshape(bins, bins), quadrants=quadrants,
                rows=_merge_rows(np.concatenate(rows)), slots=_best_slots(np.concatenate(slots)),
                truncated=bool(truncated))


# -- the trainer's hooks ------------------------------------------------------------------------


class Landscape:
    """Collects during the evaluations that write a landscape; one per trainer process."""

    def __init__(self, args: Any, *, hf_dir: str) -> None:
        self.args = args
        self.directory = Path(args.eaft_landscape)
        self.interval = args.eaft_landscape_interval
        self.hf_dir = str(hf_dir)
        self.data = (args.valid_data_path or args.data_path or args.train_data_path)[0]
        self.writer = args.rank == args.world_size - 1
        self.contributor: bool | None = None  # known once Megatron built its groups
        self.dp_group = None
        self.current: _Accumulator | None = None
        self.iteration, self.final = 0, False

    def _groups(self) -> None:
        from megatron.core import parallel_state as ps

        if self.contributor is None:
            self.contributor = (ps.is_pipeline_last_stage(ignore_virtual=True) and
                                ps.get_tensor_model_parallel_rank() ==
                                ps.get_tensor_model_parallel_world_size() - 1)
            self.dp_group = ps.get_data_parallel_group() if self.contributor else None

    def capacity_rows(self) -> int:
        """Conversations one rank can see in one evaluation (equal on every rank)."""
        from ..data.provenance import read_document_indices

        args = self.args
        batch = getattr(args, "eval_global_batch_size", None) or args.global_batch_size
        samples = max(1, args.eval_iters) * batch // args.data_parallel_size
        per_sample = int(np.diff(read_document_indices(self.data)).max())
        return samples * per_sample

    def begin(self, iteration: int, final: bool) -> None:
        self.iteration, self.final = iteration, final
        wanted = final or (self.interval is not None and iteration % self.interval == 0)
        self.current = None
        self._groups()
        if wanted and self.contributor:
            args = self.args
            self.current = _Accumulator(args.eaft_landscape_bins, args.eaft_top_k,
                                        args.eaft_conflict_entropy, args.eaft_conflict_prob)

    def hook(self, batch: dict) -> Any:
        """The per-micro-batch callback for the loss function, or None when not collecting."""
        current = self.current
        if current is None:
            return None
        cu, first = batch["cu_seqlens"], batch["first_conversation"]

        def collect(output_tensor: Any) -> None:
            stats = getattr(output_tensor, "eaft_stats", None)
            if stats is not None:
                current.add(stats, cu, first)
        return collect

    def end(self, completed: bool) -> None:
        current, self.current = self.current, None
        if current is None:
            return
        import torch
        import torch.distributed as dist

        capacity = self.capacity_rows()
        buf = torch.from_numpy(current.buffer(capacity))
        if self.args.data_parallel_size > 1:
            # the ONE collective of the landscape: gather over the last stage's DP group
            ranks = dist.get_process_group_ranks(self.dp_group)
            dst = max(ranks)
            if torch.cuda.is_available() and dist.get_backend(self.dp_group) == "nccl":
                buf = buf.cuda()
            gathered = [torch.empty_like(buf) for _ in ranks] if self.args.rank == dst else None
            dist.gather(buf, gathered, dst=dst, group=self.dp_group)
            buffers = [g.cpu().numpy() for g in gathered] if gathered is not None else None
        else:
            buffers = [buf.numpy()]
        if not self.writer or buffers is None or not completed:
            return
        merged = unpack_buffers(buffers, current.bins, capacity)
        targets = [self.directory]
        if self.interval is not None:
            targets.insert(0, self.directory / iteration_dir_name(self.iteration))
        for target in targets:
            write_landscape(target, merged, args=self.args, hf_dir=self.hf_dir, data=self.data,
                            iteration=self.iteration, final=self.final)
        print(f"> eaft_megatron.train: landscape @ {self.iteration}: confident conflicts "
              f"{_share(merged['quadrants'][3], merged['quadrants'].sum()):.4g} of "
              f"{int(merged['quadrants'].sum())} tokens -> {targets[0]}", flush=True)


_ACTIVE: list[Landscape] = []
_saved: list = []


def active() -> Landscape | None:
    return _ACTIVE[0] if _ACTIVE else None


def install_landscape_hooks(landscape: Landscape) -> None:
    """Wrap Megatron's ``evaluate_and_print_results`` (iteration, final) and ``evaluate``
    (begin / end of the collection) for ``landscape``."""
    import inspect

    import megatron.training.training as loop

    from ..compat.patching import patch, unpatch

    unpatch(_saved)
    _ACTIVE[:] = [landscape]
    where = {"iteration": 0, "final": False}

    def wrap_evaluate_and_print(original):
        signature = inspect.signature(original)

        def evaluate_and_print_results(*args, **kwargs):
            a = signature.bind(*args, **kwargs).arguments
            where["iteration"] = int(a.get("iteration", 0) or 0)
            where["final"] = " set" in str(a.get("prefix", ""))
            return original(*args, **kwargs)
        return evaluate_and_print_results

    def wrap_evaluate(original):
        def evaluate(*args, **kwargs):
            landscape.begin(where["iteration"], where["final"])
            try:
                result = original(*args, **kwargs)
            except BaseException:
                landscape.current = None
                raise
            landscape.end(completed=not result[2])
            return result
        return evaluate

    patch(loop, "evaluate_and_print_results", wrap_evaluate_and_print, _saved)
    patch(loop, "evaluate", wrap_evaluate, _saved)


# -- output -------------------------------------------------------------------------------------


def _share(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def landscape_record(merged: dict, *, args: Any, hf_dir: str, data: str, iteration: int,
                     final: bool) -> dict:
    bins = int(merged["hist"].shape[0])
    tokens = int(merged["quadrants"].sum())
    quadrants = {name: {"tokens": int(n), "share": _share(n, tokens)}
                 for name, n in zip(QUADRANTS, merged["quadrants"])}
    return {
        "iteration": iteration, "final": final, "model": os.path.abspath(hf_dir),
        "checkpoint": os.path.abspath(args.load) if args.load else None,
        "data": os.path.abspath(data), "loss_type": args.loss_type, "top_k": args.eaft_top_k,
        "entropy_mode": args.eaft_entropy,
        "thresholds": {"entropy": args.eaft_conflict_entropy, "prob": args.eaft_conflict_prob},
        "tokens": tokens, "conversations": int(len(merged["rows"])),
        "confident_conflicts": quadrants["confident_conflict"]["share"],
        "quadrants": quadrants,
        "bins": bins,
        "axes": {"rows": "normalised entropy min(H / ln K, 1), bin i = [i/bins, (i+1)/bins)",
                 "columns": "p(label), bin j = [j/bins, (j+1)/bins)"},
        "counts": merged["hist"].astype(int).tolist(),
        "truncated": merged["truncated"],
    }


class _Decoder:
    """Token ids -> text with the tokenizer stored with the model (ids only without one)."""

    def __init__(self, hf_dir: str) -> None:
        self.tok = None
        try:
            import transformers

            self.tok = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        except Exception:  # noqa: BLE001 - no (usable) tokenizer: ids only
            self.tok = None

    def __call__(self, ids: list[int]) -> str | None:
        if self.tok is None:
            return None
        return self.tok.decode([int(i) for i in ids if i >= 0])


def sample_records(merged: dict, *, data: str, hf_dir: str, top: int,
                   context: int = 12) -> list[dict]:
    from ..data.provenance import load_provenance

    try:
        provenance = load_provenance(data)
    except (OSError, ValueError):
        provenance = None
    rows = merged["rows"]
    # most conflicting first: count, then share, then conversation id
    order = sorted(range(len(rows)), key=lambda i: (-rows[i, 2], -rows[i, 2] / rows[i, 1],
                                                    rows[i, 0]))
    slots_by_conv: dict[int, np.ndarray] = {}
    slots = merged["slots"]
    for conv in np.unique(slots[:, 0]) if len(slots) else ():
        slots_by_conv[int(conv)] = slots[slots[:, 0] == conv]
    tokens = decoder = None
    if top > 0 and len(slots):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from ..data.writer import dataset_paths

        tokens = IndexedDataset(dataset_paths(data)["tokens"])
        decoder = _Decoder(hf_dir)
    documents = provenance.document_indices if provenance is not None else None
    out = []
    for rank, i in enumerate(order):
        conv, supervised, conflicts, weight_sum, evaluations = rows[i]
        conv = int(conv)
        path, line = provenance.where(conv) if provenance is not None else (None, None)
        record = {
            "rank": rank + 1, "conversation": conv,
            "sample": (int(np.searchsorted(documents, conv, side="right") - 1)
                       if documents is not None else None),
            "file": path, "line": line, "supervised_tokens": int(supervised),
            "confident_conflicts": int(conflicts),
            "conflict_share": _share(conflicts, supervised),
            "mean_gate_weight": _share(weight_sum, supervised),
        }
        if evaluations > 1:
            record["evaluations"] = int(evaluations)
        if rank < top and conv in slots_by_conv and tokens is not None:
            ids = tokens[conv]
            positions = []
            for _, pos, predicted, p, e in sorted(slots_by_conv[conv], key=lambda r: r[1]):
                pos, predicted = int(pos), int(predicted)
                label = int(ids[pos])
                before = [int(x) for x in ids[max(0, pos - context):pos]]
                positions.append({
                    "position": pos, "label": label, "predicted": predicted,
                    "p_label": float(p), "entropy": float(e),
                    "label_text": decoder([label]), "predicted_text": decoder([predicted]),
                    "context": decoder(before), "context_ids": before})
            record["conflicts"] = positions
        out.append(record)
    return out


def write_landscape(directory: Path, merged: dict, *, args: Any, hf_dir: str, data: str,
                    iteration: int, final: bool) -> None:
    record = landscape_record(merged, args=args, hf_dir=hf_dir, data=data, iteration=iteration,
                              final=final)
    samples = sample_records(merged, data=data, hf_dir=hf_dir, top=args.eaft_landscape_top)

    def write_json(tmp: Path) -> None:
        tmp.write_text(json.dumps(record, indent=1) + "\n")

    def write_samples(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")

    _atomic_write(directory / "samples.jsonl", write_samples)
    _atomic_write(directory / "landscape.json", write_json)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    _atomic_write(directory / "landscape.png",
                  lambda tmp: plot_landscapes([record], tmp, fmt="png"))


# -- the picture --------------------------------------------------------------------------------


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


def load_record(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "landscape.json"
    return json.loads(path.read_text())


def add_plot_arguments(parser: Any) -> None:
    parser.add_argument("directories", nargs="+", metavar="DIR",
                        help="one or two landscape directories (or landscape.json files)")
    parser.add_argument("--out", default=None,
                        help="output PNG (default: DIR/landscape.png for one, "
                             "DIR2/comparison.png for two)")


def run_plot(args: Any) -> int:
    if len(args.directories) > 2:
        print("landscape: give one or two directories", file=sys.stderr)
        return 2
    try:
        records = [load_record(d) for d in args.directories]
    except (OSError, ValueError) as e:
        print(f"landscape: error: {e}", file=sys.stderr)
        return 2
    last = Path(args.directories[-1])
    last = last if last.is_dir() else last.parent
    out = args.out or str(last / ("landscape.png" if len(records) == 1 else "comparison.png"))
    plot_landscapes(records, out)
    for d, r in zip(args.directories, records):
        print(f"{d}: iteration {r['iteration']}, {r['tokens']} tokens, confident conflicts "
              f"{100 * r['confident_conflicts']:.2f}%")
    print(f"-> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m eaft_megatron.train.landscape",
                                     description="Plot one landscape, or two side by side.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_plot_arguments(sub.add_parser("plot", help="landscape.json -> PNG"))
    return run_plot(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
