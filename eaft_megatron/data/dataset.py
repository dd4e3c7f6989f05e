"""The training dataset over files written by ``eaft-megatron preprocess``.

    ds = SFTIndexedDataset("data/train", seq_length=4096, seed=1234)    # --data-path, --seq-length
    sample = ds[0]
    loader = torch.utils.data.DataLoader(ds, batch_size=4)              # default_collate works
    ds = SFTIndexedDataset("data/train", num_samples=iters * gbs, start_index=consumed)  # resume

Each sample (``S = seq_length``) is a dict of tensors, the keys of Megatron-Core's GPT batches:

================  ==============  ===========================================================
``tokens``        int64 [S]       input ids, ``pad_id`` after the last conversation
``labels``        int64 [S]       ``tokens`` shifted by one: ``labels[i]`` is the id at ``i+1``
                                  when that token is supervised and in the same conversation,
                                  else -100 (our loss's ``ignore_index``; Megatron's own
                                  cross-entropy treats it as out of every vocab shard and the
                                  zero ``loss_mask`` removes it)
``loss_mask``     float32 [S]     ``labels != -100``
``position_ids``  int64 [S]       restart at 0 for every conversation (and for the padding)
``cu_seqlens``    int32 [S + 1]   conversation boundaries ``0, l1, l1 + l2, ..., S``: the padding
                                  tail is one more segment, then repeats of ``S`` fill the
                                  tensor (Megatron-Core's SFT convention, stripped by
                                  ``megatron.core.utils.flatten_batch_for_packed_sequences``)
``max_seqlen``    int32 []        longest segment
``attention_mask``bool [1, S, S]  only with ``attention_mask=True``: True = masked (Megatron's
                                  convention), block-diagonal causal over the segments
``sample_index``  int64 []        the stored sample (``self[i]`` only, not ``build_sample``)
``first_conversation`` int64 []   its first conversation's id (sequence index in the files;
                                  the row of ``OUT_provenance.npy``); segment ``j`` of
                                  ``cu_seqlens`` is conversation ``first_conversation + j``
================  ==============  ===========================================================

Samples are the packs (``--pack``) or single conversations. Attention per backend:

- ``--transformer-impl local`` (CPU, unfused ``DotProductAttention``): it takes no packed-
  sequence parameters, so ask for ``attention_mask=True`` on packed data; the dense block-
  diagonal mask keeps conversations apart (``S*S`` bytes per sample). RoPE in ``GPTModel``
  counts positions across the whole sequence, not from ``position_ids``, but is relative, so
  inside a block-diagonal mask each conversation attends exactly as if alone.
- ``--transformer-impl transformer_engine`` (GPU): flatten the batch to THD (``tokens`` as
  ``[1, b*S]``) and pass :func:`packed_seq_params` (``qkv_format="thd"`` with the merged
  ``cu_seqlens``): TE's fused/flash kernels then never attend across a boundary and apply RoPE
  per conversation. No dense mask is needed.
- Without either (plain causal mask), attention crosses conversations: only for unpacked data.

Order: with ``shuffle``, epoch ``e`` visits the stored samples in the permutation drawn from
``PCG64([seed, e])``; global sample ``g`` is position ``g % N`` of epoch ``g // N``, so
``num_samples`` may span several epochs and ``start_index`` resumes anywhere, exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from .constants import FORMAT_VERSION
from .writer import dataset_paths

IGNORE_INDEX = -100


def load_summary(path_prefix: str) -> dict[str, Any]:
    """The summary of a complete prepared dataset; raises if files are missing or mismatched."""
    paths = dataset_paths(path_prefix)
    if not os.path.isfile(paths["summary"]):
        raise FileNotFoundError(
            f"{paths['summary']} not found: {path_prefix!r} is not a complete prepared dataset "
            "(never prepared, or an interrupted `eaft-megatron preprocess`)"
        )
    with open(paths["summary"], encoding="utf-8") as f:
        summary = json.load(f)
    if summary.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{paths['summary']}: format_version {summary.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION}")
    for name, info in summary["files"].items():
        for ext in ("bin", "idx"):
            path = f"{paths[name]}.{ext}"
            actual = os.path.getsize(path) if os.path.exists(path) else None
            if actual != info[f"{ext}_bytes"]:
                raise ValueError(f"{path}: {actual} bytes on disk, the summary expects "
                                 f"{info[f'{ext}_bytes']}: files from different runs?")
    return summary


def max_token_id(path_prefix: str, summary: dict[str, Any] | None = None) -> int:
    """The largest token id of a prepared dataset: the summary's ``max_token_id`` (recorded by
    preprocess since it exists), else read from ``OUT_tokens.bin`` (memory-mapped, in chunks
    of 64 Mi ids: one pass over the file)."""
    summary = load_summary(path_prefix) if summary is None else summary
    if summary.get("max_token_id") is not None:
        return int(summary["max_token_id"])
    tokens = np.memmap(dataset_paths(path_prefix)["tokens"] + ".bin", mode="r",
                       dtype=np.dtype(summary["token_dtype"]))
    chunk = 1 << 26
    return max((int(tokens[i:i + chunk].max()) for i in range(0, tokens.size, chunk)),
               default=-1)


def block_causal_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """bool ``[1, S, S]``, True where attention is masked: causal and within one segment.

    ``cu_seqlens``: int ``[>= 2]`` boundaries from 0 to ``S`` (trailing repeats of ``S`` ok).
    """
    bounds = cu_seqlens.to(torch.int64)
    segment = torch.bucketize(torch.arange(seq_length), bounds, right=True)  # [S]
    same = segment[:, None] == segment[None, :]
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril_()
    return ~(same & causal).unsqueeze(0)


def merge_cu_seqlens(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """One int32 ``cu_seqlens`` for a batch flattened to ``[1, b*S]`` (THD).

    ``cu_seqlens``: int32 ``[b, S + 1]`` as collated from this dataset.
    """
    rows = []
    for r, row in enumerate(cu_seqlens.to(torch.int64)):
        end = int((row == seq_length).nonzero()[0]) + 1  # first S closes the row
        rows.append(row[int(r > 0):end] + r * seq_length)
    return torch.cat(rows).to(torch.int32)


def packed_seq_params(batch: dict[str, torch.Tensor]):
    """``PackedSeqParams(qkv_format="thd", ...)`` for a collated batch (tokens ``[b, S]``)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    seq_length = batch["tokens"].shape[-1]
    cu = merge_cu_seqlens(batch["cu_seqlens"].reshape(-1, seq_length + 1), seq_length)
    longest = int(batch["max_seqlen"].max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


class SFTIndexedDataset(torch.utils.data.Dataset):
    """Samples of a prepared dataset, shuffled per epoch, resumable at any sample index.

    ``path_prefix``: the ``--output-prefix`` of preprocess. ``seq_length``: sample length
    (default: the one prepared; may be larger, never smaller than the longest sample).
    ``num_samples``: dataset length, may exceed the stored samples (more epochs; default one
    epoch). ``start_index``: sample ``i`` is global sample ``start_index + i``.
    """

    def __init__(
        self,
        path_prefix: str | os.PathLike,
        *,
        seq_length: int | None = None,
        seed: int = 1234,
        shuffle: bool = True,
        num_samples: int | None = None,
        start_index: int = 0,
        attention_mask: bool = False,
    ) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.path_prefix = os.fspath(path_prefix)
        self.summary = load_summary(self.path_prefix)
        paths = dataset_paths(self.path_prefix)
        self._tokens = IndexedDataset(paths["tokens"])
        self._masks = IndexedDataset(paths["loss_mask"])
        lengths = self._tokens.sequence_lengths
        self._documents = self._tokens.document_indices
        if not (np.array_equal(lengths, self._masks.sequence_lengths)
                and np.array_equal(self._documents, self._masks.document_indices)):
            raise ValueError(f"{self.path_prefix}: tokens and loss_mask indexes differ")
        self.num_stored = len(self._documents) - 1
        if self.num_stored < 1:
            raise ValueError(f"{self.path_prefix}: no sample stored")
        sample_lengths = np.add.reduceat(lengths.astype(np.int64), self._documents[:-1])
        longest = int(sample_lengths.max())
        self.seq_length = self.summary["seq_length"] if seq_length is None else seq_length
        if self.seq_length < longest:
            raise ValueError(
                f"seq_length {self.seq_length} is shorter than the longest stored sample "
                f"({longest} tokens, prepared for {self.summary['seq_length']})")
        self.num_samples = self.num_stored if num_samples is None else num_samples
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index must be in [0, {self.num_samples}], got {start_index}")
        self.start_index = start_index
        self.seed = seed
        self.shuffle = shuffle
        self.attention_mask = attention_mask
        self.pad_id = int(self.summary["pad_id"])
        self._order: tuple[int, np.ndarray] | None = None

    @classmethod
    def from_args(cls, args: Any, **kwargs: Any) -> "SFTIndexedDataset":
        """From Megatron-LM's parsed arguments: ``--data-path PREFIX --seq-length N --seed S``."""
        paths = args.data_path if isinstance(args.data_path, (list, tuple)) else [args.data_path]
        if len(paths) != 1:
            raise ValueError(f"--data-path must be one prepared prefix, got {paths}")
        kwargs.setdefault("seed", args.seed)
        return cls(paths[0], seq_length=args.seq_length, **kwargs)

    def __len__(self) -> int:
        return self.num_samples - self.start_index

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Stored-sample indices in the order epoch ``epoch`` visits them."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(
                    self.num_stored)
            else:
                order = np.arange(self.num_stored)
            self._order = (epoch, order)
        return self._order[1]

    def stored_index(self, index: int) -> int:
        """The stored sample behind ``self[index]``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        epoch, position = divmod(self.start_index + index, self.num_stored)
        return int(self.epoch_order(epoch)[position])

    def read(self, stored: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The conversations (token ids, loss masks) of stored sample ``stored``."""
        first, last = int(self._documents[stored]), int(self._documents[stored + 1])
        return self._tokens[first:last], self._masks[first:last]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        stored = self.stored_index(index)
        ids_list, mask_list = self.read(stored)
        sample = self.build_sample(ids_list, mask_list)
        sample["sample_index"] = torch.tensor(stored, dtype=torch.int64)
        sample["first_conversation"] = torch.tensor(int(self._documents[stored]),
                                                    dtype=torch.int64)
        return sample

    def build_sample(self, ids_list: list[np.ndarray],
                     mask_list: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """The sample dict (see the module docstring) for conversations laid end to end."""
        S = self.seq_length
        lengths = np.array([a.size for a in ids_list], dtype=np.int64)
        ids = np.concatenate(ids_list).astype(np.int64)
        target = np.concatenate(mask_list).astype(bool)
        n = ids.size
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        target[bounds[:-1]] = False  # a conversation's first token is never predicted
        tokens = np.full(S, self.pad_id, dtype=np.int64)
        tokens[:n] = ids
        labels = np.full(S, IGNORE_INDEX, dtype=np.int64)
        labels[:n - 1] = np.where(target[1:], ids[1:], IGNORE_INDEX)
        if n < S:
            bounds = np.append(bounds, S)  # the padding is a segment of its own
        seg_lengths = np.diff(bounds)
        position_ids = np.arange(S, dtype=np.int64) - np.repeat(bounds[:-1], seg_lengths)
        cu_seqlens = np.full(S + 1, S, dtype=np.int32)
        cu_seqlens[:bounds.size] = bounds
        sample = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy((labels != IGNORE_INDEX).astype(np.float32)),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "max_seqlen": torch.tensor(int(seg_lengths.max()), dtype=torch.int32),
        }
        if self.attention_mask:
            sample["attention_mask"] = block_causal_mask(sample["cu_seqlens"], S)
        return sample
