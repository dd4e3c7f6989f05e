"""Write a prepared SFT dataset atomically, in Megatron-Core's indexed dataset format.

    with DatasetWriter("out/chat", token_dtype=numpy.uint16) as w:
        w.add_sample([ids_a, ids_b], [mask_a, mask_b])   # one packed sample of two conversations
        w.commit(summary)                                 # the only step that creates OUT names

Files for ``--output-prefix OUT`` (``IndexedDataset(OUT_tokens)`` etc. read them):

=======================  =========================================================================
``OUT_tokens.bin/.idx``  token ids (uint16 when the vocabulary has < 65500 ids, else int32). One
                         *sequence* per conversation; one *document* per training sample (a
                         packed sample is a document of several sequences: the index's
                         ``document_indices`` are the pack boundaries, its ``sequence_lengths``
                         the conversation lengths).
``OUT_loss_mask.bin/.idx``  uint8, same layout: 1 where the token is a training target.
``OUT_summary.json``     counts and settings (see ``pipeline.py``), written last: the marker of
                         a complete dataset. It records the byte size of every file.
=======================  =========================================================================

Until :meth:`commit`, everything goes to ``<name>.tmp-<pid>`` files, removed by :meth:`abort`
(or leaving the ``with`` block with an exception). ``commit`` first deletes any old summary at
the prefix, then renames the data files, then the summary: an interrupted run never leaves a
summary next to data it does not describe, and the dataset reader refuses a prefix without one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

SUFFIXES = {"tokens": "_tokens", "loss_mask": "_loss_mask"}
SUMMARY_SUFFIX = "_summary.json"


def dataset_paths(prefix: str) -> dict[str, str]:
    """``{"tokens": OUT_tokens, "loss_mask": OUT_loss_mask, "summary": OUT_summary.json}``."""
    paths = {name: prefix + suffix for name, suffix in SUFFIXES.items()}
    paths["summary"] = prefix + SUMMARY_SUFFIX
    return paths


class DatasetWriter:
    def __init__(self, prefix: str, *, token_dtype: type[np.number]) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self._paths = dataset_paths(prefix)
        tag = f".tmp-{os.getpid()}"
        self._renames: list[tuple[str, str]] = []
        for name in SUFFIXES:
            for ext in (".bin", ".idx"):
                final = self._paths[name] + ext
                self._renames.append((final + tag, final))
        self._summary_tmp = self._paths["summary"] + tag
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        dtypes = {"tokens": token_dtype, "loss_mask": np.uint8}
        self._builders = {name: IndexedDatasetBuilder(self._paths[name] + ".bin" + tag,
                                                      dtype=dtypes[name]) for name in SUFFIXES}
        self._tag = tag
        self._done = False

    def add_sample(self, ids: list[np.ndarray], masks: list[np.ndarray]) -> None:
        """One training sample made of one or more conversations (same lengths in both lists)."""
        lengths = [int(a.size) for a in ids]
        self._builders["tokens"].add_document(np.concatenate(ids), lengths)
        self._builders["loss_mask"].add_document(np.concatenate(masks), lengths)

    def commit(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Finalise, rename into place; returns the summary with the ``files`` entry added."""
        for name, builder in self._builders.items():
            builder.finalize(self._paths[name] + ".idx" + self._tag)
        files = {}
        for name in SUFFIXES:
            base = os.path.basename(self._paths[name])
            files[name] = {
                "prefix": base,
                **{f"{ext}_bytes": os.path.getsize(self._paths[name] + f".{ext}" + self._tag)
                   for ext in ("bin", "idx")},
            }
        summary = {**summary, "files": files}
        with open(self._summary_tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(self._paths["summary"]):
            os.remove(self._paths["summary"])
        for tmp, final in self._renames:
            os.replace(tmp, final)
        os.replace(self._summary_tmp, self._paths["summary"])
        self._done = True
        return summary

    def abort(self) -> None:
        """Close and delete every temporary file (idempotent)."""
        if self._done:
            return
        for builder in self._builders.values():
            if not builder.data_file.closed:
                builder.data_file.close()
        for tmp, _ in self._renames:
            if os.path.exists(tmp):
                os.remove(tmp)
        if os.path.exists(self._summary_tmp):
            os.remove(self._summary_tmp)
        self._done = True

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()
