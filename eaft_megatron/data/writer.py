"""Write a prepared SFT dataset atomically, in Megatron-Core's indexed dataset format.

    check_outputs("out/chat", inputs=["chat.jsonl"])   # before any work: overlap, stale temps
    with DatasetWriter("out/chat", token_dtype=numpy.uint16) as w:
        w.add_sample([ids_a, ids_b], [mask_a, mask_b])   # one packed sample of two conversations
        w.commit(summary)                                 # the only step that creates OUT names

Files for ``--output-prefix OUT`` (megatron-core's ``IndexedDataset(OUT_tokens)`` reads them):

=======================  =========================================================================
``OUT_tokens.bin/.idx``  token ids (uint16 when the vocabulary has < 65500 ids, else int32). One
                         *sequence* per conversation; one *document* per training sample (a
                         packed sample is a document of several sequences: the index's
                         ``document_indices`` are the pack boundaries, its ``sequence_lengths``
                         the conversation lengths).
``OUT_loss_mask.bin/.idx``  uint8, same layout: 1 where the token is a training target.
``OUT_provenance.npy``   int64 ``[conversations, 2]``, in the order of the conversations
                         (sequences) in the files above: the index of the input file in the
                         summary's ``inputs`` and the 1-based line it came from. With packing, a
                         sample's conversations are rows ``document_indices[i]`` to
                         ``document_indices[i + 1] - 1`` (see :func:`dataset.load_provenance`).
``OUT_summary.json``     counts and settings (see ``pipeline.py``), written last: the marker of
                         a complete dataset. It records the byte size of every file.
=======================  =========================================================================

The format is written here (numpy only), not through megatron-core's builder: importing
megatron-core costs seconds, a gigabyte and, on machines without CUDA, a warning, for what is a
plain array dump. ``.idx`` layout (little-endian): ``b"MMIDIDX\\0\\0"``, version ``<Q`` 1, dtype
code ``<B``, sequence count ``<Q``, document count + 1 ``<Q``; then ``int32`` sequence lengths,
``int64`` byte offsets of the sequences in ``.bin``, ``int64`` document boundaries (sequence
indices, starting with 0). The tests read every file back with megatron-core's own reader.

Safety (:mod:`eaft_megatron.paths`): no output file may be, contain or lie inside an input; each
file is written to an owner-named temporary (``.OUT_tokens.bin.tmp-<host>-<pid>-...``) removed on
any failure or interruption; temporaries left by killed runs of the same prefix are removed and
reported at the start, those of a live concurrent run make the run stop instead. ``commit``
deletes any old summary first, then renames the data files, then the summary: an interrupted run
never leaves a summary next to data it does not describe, and the dataset reader refuses a
prefix without one.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..paths import UnsafePathError, atomic_output, check_output, overlaps, remove_stale_temps

SUFFIXES = {"tokens": "_tokens", "loss_mask": "_loss_mask"}
SUMMARY_SUFFIX = "_summary.json"
PROVENANCE_SUFFIX = "_provenance.npy"
INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}


def dataset_paths(prefix: str) -> dict[str, str]:
    """``{"tokens": OUT_tokens, "loss_mask": OUT_loss_mask, "summary": OUT_summary.json}``."""
    paths = {name: prefix + suffix for name, suffix in SUFFIXES.items()}
    paths["summary"] = prefix + SUMMARY_SUFFIX
    paths["provenance"] = prefix + PROVENANCE_SUFFIX
    return paths


def output_files(prefix: str) -> list[str]:
    """Every file of a dataset, the summary first."""
    paths = dataset_paths(prefix)
    return [paths["summary"]] + [paths[name] + ext for name in SUFFIXES
                                 for ext in (".bin", ".idx")] + [paths["provenance"]]


def token_dtype(vocab_size: int | None) -> type[np.number]:
    """Megatron's choice: uint16 when every id is below 65500, else int32 (unknown: int32)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def _relation(prefix: str, path: str) -> str:
    a, b = Path(prefix).resolve(), Path(path).resolve()
    if a == b:
        return "is"
    return "is inside" if b in a.parents else "contains" if a in b.parents else "overlaps"


def check_outputs(prefix: str, inputs: list[str], *, force: bool = False, report=None) -> None:
    """Before any work: refuse a prefix that is, is inside or contains an input, or whose files
    would overwrite one (symlinks resolved); refuse a prefix holding a dataset (any of its
    files) unless ``force``; remove (and report) temporaries of killed runs of this prefix;
    refuse if a live run is writing it. Raises ``UnsafePathError``."""
    for path in inputs:
        if overlaps(prefix, path):
            raise UnsafePathError(f"--output-prefix {prefix} {_relation(prefix, path)} the input "
                                  f"{path}: choose a prefix outside the inputs")
        for final in output_files(prefix):
            if overlaps(final, path):
                raise UnsafePathError(f"--output-prefix {prefix} would overwrite the input {path} "
                                      f"(output file {final})")
    parent = Path(prefix).resolve().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UnsafePathError(f"--output-prefix {prefix}: cannot create files in {existing}")
    for final in output_files(prefix):
        check_output(final, force=True, directory=False)  # not a directory
        remove_stale_temps(final, **({} if report is None else {"report": report}))
    existing = [f for f in output_files(prefix) if os.path.lexists(f)]
    if existing and not force:
        raise UnsafePathError(f"--output-prefix {prefix} already holds a dataset "
                              f"({', '.join(os.path.basename(f) for f in existing[:2])}"
                              f"{', ...' if len(existing) > 2 else ''}): choose another prefix, "
                              f"or pass --force to replace it")


class _IndexedFile:
    """One ``.bin`` being written, and its ``.idx`` at ``finalize``."""

    def __init__(self, bin_path: Path, dtype: type[np.number]) -> None:
        self.dtype = np.dtype(dtype)
        self.file = open(bin_path, "wb")
        self.lengths: list[int] = []
        self.documents = [0]  # sequence index where each document ends

    def add_document(self, arrays: list[np.ndarray]) -> None:
        self.file.write(np.concatenate(arrays).astype(self.dtype, copy=False).tobytes())
        self.lengths.extend(int(a.size) for a in arrays)
        self.documents.append(len(self.lengths))

    def finalize(self, idx_path: Path) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        offsets = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=offsets[1:])
        with open(idx_path, "wb") as f:
            f.write(INDEX_HEADER + struct.pack("<QBQQ", 1, DTYPE_CODES[self.dtype.type],
                                               lengths.size, len(self.documents)))
            f.write(lengths.tobytes())
            f.write(offsets.tobytes())
            f.write(np.asarray(self.documents, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())


class DatasetWriter:
    def __init__(self, prefix: str, *, token_dtype: type[np.number],
                 inputs: list[str] = ()) -> None:
        self.prefix = prefix
        self._paths = dataset_paths(prefix)
        self._stack = contextlib.ExitStack()
        self._done = False
        try:
            # entered summary first: the renames at exit go data files first, summary last
            self._tmp = {final: self._stack.enter_context(atomic_output(
                final, inputs=list(inputs), force=True, directory=False, report=lambda _: None))
                for final in output_files(prefix)}
            dtypes = {"tokens": token_dtype, "loss_mask": np.uint8}
            self._files = {name: _IndexedFile(self._tmp[self._paths[name] + ".bin"], dtypes[name])
                           for name in SUFFIXES}
            self._origins = array.array("q")  # (input index, line) per conversation
        except BaseException:
            self._stack.close()
            raise

    def add_sample(self, ids: list[np.ndarray], masks: list[np.ndarray],
                   origins: list[tuple[int, int]] | None = None) -> None:
        """One training sample made of one or more conversations (same lengths in the lists);
        ``origins``: (input file index, line) of each conversation (``(-1, -1)``: unknown)."""
        self._files["tokens"].add_document(ids)
        self._files["loss_mask"].add_document(masks)
        for file_index, line in origins or [(-1, -1)] * len(ids):
            self._origins.extend((file_index, line))

    def commit(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Finalise, rename into place; returns the summary with the ``files`` entry added."""
        files = {}
        for name, indexed in self._files.items():
            indexed.finalize(self._tmp[self._paths[name] + ".idx"])
            files[name] = {
                "prefix": os.path.basename(self._paths[name]),
                **{f"{ext}_bytes": os.path.getsize(self._tmp[self._paths[name] + f".{ext}"])
                   for ext in ("bin", "idx")},
            }
        provenance = self._tmp[self._paths["provenance"]]
        with open(provenance, "wb") as f:
            np.save(f, np.frombuffer(self._origins, dtype=np.int64).reshape(-1, 2))
            f.flush()
            os.fsync(f.fileno())
        summary = {**summary, "files": files, "provenance": {
            "file": os.path.basename(self._paths["provenance"]),
            "bytes": os.path.getsize(provenance), "columns": ["input", "line"]}}
        with open(self._tmp[self._paths["summary"]], "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._paths["summary"])
        self._done = True
        self._stack.close()  # the renames
        return summary

    def abort(self, exc: BaseException | None = None) -> None:
        """Close and delete every temporary file (idempotent)."""
        if self._done:
            return
        self._done = True
        for indexed in self._files.values():
            indexed.file.close()
        exc = exc or RuntimeError("dataset not committed")
        self._stack.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort(exc)
