"""Where each prepared conversation came from: ``OUT_provenance.npy`` written by ``preprocess``.

    prov = load_provenance("data/train")        # None for datasets prepared before provenance
    prov.where(17)                              # ("/abs/chat.jsonl", 42): input file and line
    prov.conversations_of(sample_index=3)       # conversation ids of stored sample 3 (a pack)

Conversation ids are the sequence indices of the indexed dataset (``OUT_tokens.idx``), in the
order written; a stored sample ``i`` (a pack, or one conversation) holds conversations
``document_indices[i]`` to ``document_indices[i + 1] - 1``. numpy only (no torch).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .writer import INDEX_HEADER, dataset_paths

__all__ = ["Provenance", "load_provenance", "read_document_indices"]


def read_document_indices(prefix: str) -> np.ndarray:
    """``document_indices`` of ``OUT_tokens.idx`` (int64, samples + 1 entries), read directly."""
    path = dataset_paths(prefix)["tokens"] + ".idx"
    with open(path, "rb") as f:
        header = f.read(len(INDEX_HEADER) + 8 + 1 + 8 + 8)
        if not header.startswith(INDEX_HEADER):
            raise ValueError(f"{path}: not an indexed dataset index")
        n_seq, n_doc = np.frombuffer(header[len(INDEX_HEADER) + 9:], dtype="<u8")
        f.seek(int(n_seq) * (4 + 8), os.SEEK_CUR)
        return np.frombuffer(f.read(int(n_doc) * 8), dtype="<i8").astype(np.int64)


@dataclass
class Provenance:
    inputs: list[str]  # the summary's input files (absolute paths)
    origins: np.ndarray  # int64 [conversations, 2]: input index, line (1-based)
    document_indices: np.ndarray  # int64 [samples + 1]

    def where(self, conversation: int) -> tuple[str | None, int | None]:
        file_index, line = (int(x) for x in self.origins[conversation])
        if file_index < 0:
            return None, None
        return self.inputs[file_index], line

    def conversations_of(self, sample_index: int) -> range:
        return range(int(self.document_indices[sample_index]),
                     int(self.document_indices[sample_index + 1]))


def load_provenance(prefix: str) -> Provenance | None:
    """The provenance of a prepared dataset, or None when it has none (prepared before it was
    recorded). Raises ``ValueError`` when the file does not match the summary."""
    paths = dataset_paths(prefix)
    with open(paths["summary"], encoding="utf-8") as f:
        summary = json.load(f)
    info = summary.get("provenance")
    if info is None or not os.path.isfile(paths["provenance"]):
        return None
    if os.path.getsize(paths["provenance"]) != info["bytes"]:
        raise ValueError(f"{paths['provenance']}: size differs from the summary's "
                         f"({info['bytes']} bytes): files from different runs?")
    origins = np.load(paths["provenance"], allow_pickle=False)
    return Provenance(list(summary["inputs"]), origins, read_document_indices(prefix))
