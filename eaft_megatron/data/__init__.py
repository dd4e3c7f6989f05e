"""SFT data: chat JSONL -> Megatron indexed dataset with assistant-only loss masks, and back.

    eaft-megatron preprocess --input chat.jsonl --tokenizer /models/Qwen3-8B \\
        --output-prefix data/chat --seq-length 4096 --pack --workers 8

    from eaft_megatron.data import SFTIndexedDataset
    ds = SFTIndexedDataset("data/chat", seq_length=4096, seed=1234)

=================  ==============================================================================
``formats.py``     input formats (messages, ShareGPT, Alpaca, text, tokenized), auto-detection
``tokenizer.py``   loading local tokenizers; record -> (ids, loss mask)
``hf_chat.py``     Hugging Face chat templates, assistant turns located and verified per token
``sp_chat.py``     SentencePiece ``.model`` with a documented role-tag prompt format
``packing.py``     streaming first-fit packing, never splitting a conversation
``writer.py``      atomic ``.bin``/``.idx`` + summary output (megatron-core's indexed format)
``workers.py``     tokenizer worker processes that fail fast and die with the parent
``pipeline.py``    the pipeline: read, tokenize (in workers), pack, write, report progress
``command.py``     the ``preprocess`` console sub-command (light: ``--help`` imports nothing)
``dataset.py``     the training ``torch.utils.data.Dataset`` and attention helpers
``provenance.py``  input file and line of every prepared conversation (``OUT_provenance.npy``)
=================  ==============================================================================

Names are imported lazily: ``import eaft_megatron.data`` loads neither torch nor megatron.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "preprocess": "pipeline", "PreprocessError": "pipeline", "WorkerDied": "workers",
    "InvalidRecord": "formats", "parse_line": "formats", "parse_record": "formats",
    "FORMATS": "formats",
    "ConfigError": "errors", "load_tokenizer": "tokenizer", "encode_record": "tokenizer",
    "Packer": "packing",
    "dataset_paths": "writer",
    "SFTIndexedDataset": "dataset", "load_summary": "dataset", "block_causal_mask": "dataset",
    "merge_cu_seqlens": "dataset", "packed_seq_params": "dataset",
    "load_provenance": "provenance", "Provenance": "provenance",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
