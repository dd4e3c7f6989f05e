"""The landscape's files (see :mod:`.landscape`): ``landscape.json`` (the record),
``samples.jsonl`` (conversations, most conflicting first, their conflicting positions decoded)
and ``landscape.png`` (:func:`eaft_megatron.plots.plot_landscapes`), each written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .landscape_stats import QUADRANTS

__all__ = ["NO_MATPLOTLIB", "landscape_record", "sample_records", "share", "write_landscape"]

NO_MATPLOTLIB = ("matplotlib is not installed (pip install matplotlib, or the package's [test] "
                 "extra); landscape.json and samples.jsonl are written, and `eaft-megatron "
                 "landscape DIR` draws landscape.png later")


def share(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)``, then ``tmp`` replaces ``path`` (:func:`~eaft_megatron.paths.atomic_output`,
    one file)."""
    from ..paths import atomic_output

    with atomic_output(path, directory=False, force=True) as tmp:
        write(tmp)


def landscape_record(merged: dict, *, args: Any, hf_dir: str, data: str, iteration: int,
                     final: bool) -> dict:
    bins = int(merged["hist"].shape[0])
    tokens = int(merged["quadrants"].sum())
    quadrants = {name: {"tokens": int(n), "share": share(n, tokens)}
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
    rows = merged["rows"].copy()
    # per evaluated copy: an evaluation that cycles over the data counts a conversation n times
    copies = np.maximum(rows[:, 4], 1)
    rows[:, 1:4] /= copies[:, None]
    # most conflicting first: count per copy, then share, then conversation id
    order = sorted(range(len(rows)), key=lambda i: (-rows[i, 2], -share(rows[i, 2], rows[i, 1]),
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
            "file": path, "line": line, "supervised_tokens": int(round(supervised)),
            "confident_conflicts": int(round(conflicts)),
            "conflict_share": share(conflicts, supervised),
            "mean_gate_weight": share(weight_sum, supervised),
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
        print(f"eaft_megatron.train: warning: {directory / 'landscape.png'} not drawn: "
              f"{NO_MATPLOTLIB}", flush=True)
        return
    from ..plots import plot_landscapes

    _atomic_write(directory / "landscape.png",
                  lambda tmp: plot_landscapes([record], tmp, fmt="png"))
