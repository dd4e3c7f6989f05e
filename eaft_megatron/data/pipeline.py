"""``eaft-megatron preprocess``: chat JSONL -> Megatron indexed dataset with assistant-only masks.

    eaft-megatron preprocess --input train.jsonl more.jsonl --tokenizer /models/Qwen3-8B \\
        --output-prefix data/train --seq-length 4096 --pack --workers 8
    eaft-megatron preprocess --input tok.jsonl --format tokenized --output-prefix data/tok \\
        --seq-length 2048                                  # pre-tokenized: no tokenizer needed

    from eaft_megatron.data import preprocess
    summary = preprocess(["train.jsonl"], tokenizer="/models/Qwen3-8B",
                         output_prefix="data/train", seq_length=4096, pack=True, workers=8)

Lines are read in order, cut into chunks and tokenized by ``workers`` processes (forked, so the
tokenizer is loaded once; results come back in input order, so the output does not depend on
``workers``; a worker that dies fails the run at once, see ``workers.py``); the parent process
reads lines, packs and writes, and reports progress (``progress.py``: a bar on a terminal, a
line every 10 s in logs). Over-long conversations
(``> seq_length`` tokens) are cut to ``seq_length`` (``overlong="truncate"``, counted as
``truncated``; dropped instead when no supervised token survives the cut) or dropped
(``"drop"``), counted as ``dropped_overlong``. A bad line stops the run with ``file:line:
reason`` unless ``skip_invalid``, which counts it in ``skipped`` / ``skipped_reasons``.

Output files: see ``writer.py``. The summary (``OUT_summary.json``) holds ``documents``
(conversations written), ``sequences`` (training samples: packs, or one per conversation),
``tokens``, ``supervised_tokens``, ``truncated``, ``dropped_overlong``, ``skipped``,
``skipped_reasons``, ``skipped_examples`` (first 10 ``file:line: reason``), ``records``
(non-blank lines), ``formats`` (records per detected format), ``seq_length``, ``packed``,
``overlong``, ``pack_fill`` (tokens / (sequences * seq_length)), ``max_document_tokens``,
``max_token_id`` (the largest id written: the trainer compares it with the model's vocabulary),
``token_dtype``, ``tokenizer`` (path, kind, vocab_size, eos_id, pad_id; null for tokenized
input without tokenizer), ``pad_id``, ``inputs``, ``elapsed_s``, ``format_version``, ``files``
and ``provenance`` (``OUT_provenance.npy``: input file and line of every conversation).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..progress import Progress
from .constants import FORMAT_VERSION, OVERLONG
from .errors import ConfigError
from .formats import FORMATS, InvalidRecord, parse_line
from .tokenizer import ChatTokenizer, encode_record, load_tokenizer
from .writer import DatasetWriter, check_outputs, token_dtype
CHUNK_LINES = 256
CHUNK_BYTES = 1 << 20


class PreprocessError(RuntimeError):
    """A run that cannot complete; the message starts with ``file:line:`` for a bad line."""


# -- tokenization, in worker processes or in-process -------------------------------------------


@dataclass
class _Chunk:
    file_index: int
    line_nos: list[int]
    lines: list[bytes]
    physical_lines: int  # lines consumed, blank ones included (progress bar)


@dataclass
class _Encoded:
    line_nos: list[int] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    fatal: tuple[int, str] | None = None


def _encode_lines(tokenizer: ChatTokenizer | None, fmt: str, chunk: _Chunk) -> _Encoded:
    out = _Encoded()
    for line_no, raw in zip(chunk.line_nos, chunk.lines):
        try:
            record_format, record = parse_line(raw, fmt)
            ids, mask = encode_record(record, tokenizer)
        except InvalidRecord as e:
            out.errors.append((line_no, str(e)))
            continue
        except ConfigError as e:
            out.fatal = (line_no, str(e))
            break
        out.line_nos.append(line_no)
        out.formats.append(record_format)
        out.ids.append(ids)
        out.masks.append(mask)
    return out


def _read_chunks(paths: Sequence[str]) -> Iterator[_Chunk]:
    for file_index, path in enumerate(paths):
        with open(path, "rb") as f:
            chunk, size = _Chunk(file_index, [], [], 0), 0
            for line_no, raw in enumerate(f, 1):
                chunk.physical_lines += 1
                if raw.isspace():
                    continue
                chunk.line_nos.append(line_no)
                chunk.lines.append(raw)
                size += len(raw)
                if len(chunk.lines) >= CHUNK_LINES or size >= CHUNK_BYTES:
                    yield chunk
                    chunk, size = _Chunk(file_index, [], [], 0), 0
            if chunk.physical_lines:
                yield chunk


def _where(path: str, chunk: _Chunk) -> str:
    if not chunk.line_nos:
        return f"{path} (blank lines)"
    return f"{path} lines {chunk.line_nos[0]}-{chunk.line_nos[-1]}"


@contextlib.contextmanager
def _worker_pool(tokenizer: ChatTokenizer | None, fmt: str, workers: int) -> Iterator[Any]:
    """``workers`` processes holding the tokenizer (``None`` for ``workers == 1``), started
    before any writer exists (see workers.py: a killed worker fails the run at once)."""
    if workers == 1:
        yield None
        return
    from .workers import WorkerPool

    with WorkerPool(_encode_lines, (tokenizer, fmt), workers=workers) as pool:
        yield pool


def _encoded_chunks(chunks: Iterator[_Chunk], pool: Any, tokenizer: ChatTokenizer | None,
                    fmt: str, paths: Sequence[str]) -> Iterator[tuple[_Chunk, _Encoded]]:
    """``(chunk, result)`` in input order; with a pool, at most 4 chunks per worker in flight."""
    if pool is None:
        for chunk in chunks:
            yield chunk, _encode_lines(tokenizer, fmt, chunk)
        return
    in_flight = 4 * len(pool)
    pending: deque = deque()
    for chunk in chunks:
        lines, chunk.lines = chunk.lines, []  # do not keep raw lines in the parent
        pool.submit(_Chunk(chunk.file_index, chunk.line_nos, lines, 0),
                    where=_where(paths[chunk.file_index], chunk))
        pending.append(chunk)
        if len(pending) >= in_flight:
            yield pending.popleft(), pool.next_result()
    while pending:
        yield pending.popleft(), pool.next_result()


def _count_lines(path: str) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


# -- the pipeline --------------------------------------------------------------------------------


def _validate(inputs: Sequence[str], *, seq_length: int, fmt: str, workers: int,
              overlong: str) -> None:
    if not inputs:
        raise ValueError("inputs must be a non-empty list of JSONL paths, got none")
    for path in inputs:
        if os.path.isdir(path):
            raise FileNotFoundError(f"--input {path}: is a directory, not a JSONL file")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--input {path}: no such file")
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 2:
        raise ValueError(f"seq_length must be an integer >= 2, got {seq_length!r}")
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {', '.join(FORMATS)}, got {fmt!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")


class _Sink:
    """Over-long handling, packing and writing of encoded conversations, with their counts."""

    def __init__(self, writer: Any, *, seq_length: int, pack: bool, overlong: str) -> None:
        from .packing import Packer

        self.writer = writer
        self.seq_length = seq_length
        self.overlong = overlong
        self.packer = Packer(capacity=seq_length) if pack else None
        self.counts: Counter = Counter()
        self.max_document = 0
        self.max_id = -1

    def add(self, ids: np.ndarray, mask: np.ndarray, origin: tuple[int, int] = (-1, -1)
            ) -> None:
        if ids.size > self.seq_length:
            if self.overlong == "drop" or not mask[:self.seq_length].any():
                self.counts["dropped_overlong"] += 1
                return
            ids, mask = ids[:self.seq_length], mask[:self.seq_length]
            self.counts["truncated"] += 1
        self.counts["documents"] += 1
        self.counts["tokens"] += ids.size
        self.counts["supervised_tokens"] += int(mask.sum())
        self.max_document = max(self.max_document, ids.size)
        self.max_id = max(self.max_id, int(ids.max()) if ids.size else -1)
        item = (ids, mask, origin)
        packs = [[item]] if self.packer is None else self.packer.add(ids.size, item)
        for items in packs:
            self._write(items)

    def close(self) -> None:
        for items in self.packer.flush() if self.packer is not None else ():
            self._write(items)

    def _write(self, items: list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]) -> None:
        self.writer.add_sample([item[0] for item in items], [item[1] for item in items],
                               [item[2] for item in items])
        self.counts["sequences"] += 1


def preprocess(
    inputs: Sequence[str | os.PathLike],
    *,
    output_prefix: str | os.PathLike,
    seq_length: int,
    tokenizer: str | os.PathLike | None = None,
    fmt: str = "auto",
    pack: bool = False,
    workers: int = 1,
    skip_invalid: bool = False,
    overlong: str = "truncate",
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare ``inputs`` (JSONL files) into ``output_prefix``; returns the written summary.

    Raises :class:`PreprocessError` for a bad line (``file:line: reason``) or a set-up problem
    met while reading, :class:`ConfigError` for an unusable tokenizer, ``ValueError`` /
    ``FileNotFoundError`` for bad arguments, ``paths.UnsafePathError`` (a ``ValueError``) for an
    output prefix that overlaps an input, that a live run is writing, or that already holds
    a dataset (unless ``force``: the new one then replaces it when complete), and
    ``workers.WorkerDied`` when a worker process dies (naming the chunk it held). Nothing is
    left at ``output_prefix`` on failure. ``progress``: see :mod:`eaft_megatron.progress`.
    """
    started = time.perf_counter()
    if isinstance(inputs, (str, bytes, os.PathLike)):
        raise ValueError(f"inputs must be a list of JSONL paths, got the single path {inputs!r}")
    inputs = [os.fspath(p) for p in inputs]
    output_prefix = os.fspath(output_prefix)
    _validate(inputs, seq_length=seq_length, fmt=fmt, workers=workers, overlong=overlong)
    check_outputs(output_prefix, inputs, force=force)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is None and fmt not in ("auto", "tokenized"):
        raise ConfigError(f"--format {fmt} needs --tokenizer (only 'tokenized' input does not)")
    dtype = token_dtype(None if tok is None else tok.vocab_size)
    formats: Counter = Counter()
    skipped_reasons: Counter = Counter()
    skipped_examples: list[str] = []
    # pipes (--input /dev/stdin) can be read once only: no total for the progress bar then
    total_lines = sum(map(_count_lines, inputs)) if all(map(os.path.isfile, inputs)) else None
    with _worker_pool(tok, fmt, workers) as pool, \
            DatasetWriter(output_prefix, token_dtype=dtype, inputs=inputs) as writer, \
            Progress(total=total_lines, desc="preprocess", unit="lines", enabled=progress) as bar:
        sink = _Sink(writer, seq_length=seq_length, pack=pack, overlong=overlong)
        counts = sink.counts
        for chunk, enc in _encoded_chunks(_read_chunks(inputs), pool, tok, fmt, inputs):
            path = inputs[chunk.file_index]
            bad = enc.errors[0] if enc.errors and not skip_invalid else None
            if enc.fatal and (bad is None or enc.fatal[0] < bad[0]):
                raise PreprocessError(f"{path}:{enc.fatal[0]}: {enc.fatal[1]}")
            if bad:
                raise PreprocessError(
                    f"{path}:{bad[0]}: {bad[1]} (pass --skip-invalid to skip and count such lines)"
                )
            for line_no, reason in enc.errors:
                skipped_reasons[reason.split(":", 1)[0]] += 1
                if len(skipped_examples) < 10:
                    skipped_examples.append(f"{path}:{line_no}: {reason}")
            counts["skipped"] += len(enc.errors)
            counts["records"] += len(enc.errors) + len(enc.ids)
            formats.update(enc.formats)
            for ids, mask, line_no in zip(enc.ids, enc.masks, enc.line_nos):
                sink.add(ids, mask, (chunk.file_index, line_no))
            bar.update(chunk.physical_lines, docs=counts["documents"], skipped=counts["skipped"])
        sink.close()
        if counts["documents"] == 0:
            raise PreprocessError(
                f"no training example in {', '.join(inputs)}: {counts['records']} records, "
                f"{counts['skipped']} skipped, {counts['dropped_overlong']} dropped as over-long"
            )
        summary = {
            "format_version": FORMAT_VERSION,
            **{key: int(counts[key]) for key in (
                "documents", "sequences", "tokens", "supervised_tokens", "truncated",
                "dropped_overlong", "skipped", "records")},
            "skipped_reasons": dict(skipped_reasons),
            "skipped_examples": skipped_examples,
            "formats": dict(formats),
            "seq_length": seq_length,
            "packed": bool(pack),
            "overlong": overlong,
            "pack_fill": round(counts["tokens"] / (counts["sequences"] * seq_length), 4),
            "max_document_tokens": int(sink.max_document),
            "max_token_id": sink.max_id,
            "token_dtype": np.dtype(dtype).name,
            "tokenizer": None if tok is None else {
                "path": os.path.abspath(tok.path), "kind": tok.kind,
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
            "pad_id": 0 if tok is None else tok.pad_id,
            "inputs": [os.path.abspath(p) for p in inputs],
            "elapsed_s": round(time.perf_counter() - started, 3),
        }
        return writer.commit(summary)
