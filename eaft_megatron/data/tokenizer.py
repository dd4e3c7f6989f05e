"""Tokenizers from local files, and records -> (token ids, loss mask).

    tok = load_tokenizer("/models/Qwen3-8B")        # Hugging Face directory: its chat template
    tok = load_tokenizer("/models/llama2/tok.model") # SentencePiece: the prompt format of sp_chat
    ids, mask = encode_record(record, tok)           # int32 [n], uint8 [n]

``mask[t] = 1`` means token ``t`` is a training target (predicted from tokens ``< t``). The first
token of a record never is (nothing precedes it), so ``mask[0] = 0`` always.

Nothing is ever downloaded: Hugging Face directories are opened with ``local_files_only=True``
and without remote code.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from .errors import ConfigError
from .formats import Conversation, InvalidRecord, Record, TextRecord, TokenizedRecord

__all__ = ["ChatTokenizer", "ConfigError", "encode_record", "load_tokenizer"]


class ChatTokenizer(Protocol):
    """What the pipeline needs from a tokenizer (see hf_chat.py and sp_chat.py)."""

    kind: str            # "hf" | "sentencepiece"
    path: str
    vocab_size: int      # ids are in [0, vocab_size)
    eos_id: int | None
    pad_id: int          # id written into padding positions (never supervised)

    def encode_conversation(self, conv: Conversation) -> tuple[list[int], list[int]]:
        """``(ids, mask)``: assistant turns (with their end-of-turn token) have mask 1."""

    def encode_text(self, text: str) -> list[int]:
        """Plain text as the model sees it (BOS/EOS as the tokenizer defines them)."""


def load_tokenizer(path: str | os.PathLike) -> ChatTokenizer:
    """A Hugging Face tokenizer directory, or a SentencePiece ``.model`` file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from .hf_chat import HFChatTokenizer

        return HFChatTokenizer(path)
    if os.path.isfile(path) and path.endswith(".model"):
        from .sp_chat import SentencePieceChatTokenizer

        return SentencePieceChatTokenizer(path)
    what = "does not exist" if not os.path.exists(path) else "is neither"
    raise ConfigError(
        f"--tokenizer {path!r} {what}: expected a Hugging Face tokenizer directory "
        "(tokenizer.json / tokenizer_config.json) or a SentencePiece .model file"
    )


def encode_record(
    record: Record, tokenizer: ChatTokenizer | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [n], mask uint8 [n])`` for any record; raises :class:`InvalidRecord`.

    Text records supervise every token; tokenized records supervise labels != -100 and are
    checked against the tokenizer's vocabulary when one is given.
    """
    if isinstance(record, TokenizedRecord):
        ids = record.input_ids
        if tokenizer is not None:
            bad = next((i for i, x in enumerate(ids) if x >= tokenizer.vocab_size), None)
            if bad is not None:
                raise InvalidRecord(
                    f"input_ids[{bad}] = {ids[bad]} is outside the tokenizer's vocabulary "
                    f"[0, {tokenizer.vocab_size})"
                )
        labels = record.labels
        mask = [1] * len(ids) if labels is None else [int(y != -100) for y in labels]
    else:
        if tokenizer is None:
            kind = "text" if isinstance(record, TextRecord) else "conversation"
            raise ConfigError(f"a {kind} record needs a tokenizer: pass --tokenizer")
        if isinstance(record, TextRecord):
            ids = tokenizer.encode_text(record.text)
            mask = [1] * len(ids)
        else:
            ids, mask = tokenizer.encode_conversation(record)
    ids_arr = np.asarray(ids, dtype=np.int32)
    mask_arr = np.asarray(mask, dtype=np.uint8)
    if ids_arr.size:
        mask_arr[0] = 0
    if ids_arr.size < 2 or not mask_arr.any():
        raise InvalidRecord(f"no supervised token in {ids_arr.size} tokens")
    return ids_arr, mask_arr
