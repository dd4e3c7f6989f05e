"""SentencePiece ``.model`` tokenizers with a simple, documented prompt format.

    tok = SentencePieceChatTokenizer("tokenizer.model")
    ids, mask = tok.encode_conversation(Conversation(messages))

A SentencePiece model has no chat template, so conversations are written as role tags and
contents, each piece encoded on its own and the ids concatenated (so every boundary is a token
boundary by construction, and the mask is exact)::

    [BOS] enc("System:") enc(system) enc("User:") enc(user) enc("Assistant:") enc(reply) [EOS]
          enc("User:") enc(user) enc("Assistant:") enc(reply) [EOS] ...

Supervised: ``enc(reply) [EOS]`` of every assistant turn. Tool results use ``"Tool:"``; a list
of ``tools`` becomes a first ``"Tools:"`` piece holding their JSON; an assistant's
``tool_calls`` are appended to its reply as JSON (supervised). ``reasoning_content`` is not
rendered. BOS is written when the model defines one; EOS is required. At inference, prompt the
model with the same pieces ending in ``enc("Assistant:")`` and stop at EOS. Each ``enc`` adds
SentencePiece's word-boundary prefix, so ``decode`` shows the pieces separated by spaces.

Plain text is ``[BOS] enc(text) [EOS]``.
"""

from __future__ import annotations

import json

from .formats import Conversation
from .errors import ConfigError

ROLE_TAGS = {"system": "System:", "user": "User:", "assistant": "Assistant:", "tool": "Tool:"}
TOOLS_TAG = "Tools:"


class SentencePieceChatTokenizer:
    kind = "sentencepiece"

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:  # noqa: BLE001 - corrupt or foreign file
            raise ConfigError(f"cannot load SentencePiece model {path!r}: {e}") from e
        self.path = path
        self.vocab_size = self._sp.get_piece_size()
        bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = eos if eos >= 0 else None
        self.pad_id = pad if pad >= 0 else (eos if eos >= 0 else 0)
        self._tags = {role: self._sp.encode(tag) for role, tag in ROLE_TAGS.items()}
        self._tools_tag = self._sp.encode(TOOLS_TAG)

    def encode_text(self, text: str) -> list[int]:
        ids = [self.bos_id] if self.bos_id is not None else []
        ids += self._sp.encode(text)
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode_conversation(self, conv: Conversation) -> tuple[list[int], list[int]]:
        if self.eos_id is None:
            raise ConfigError(
                f"SentencePiece model {self.path!r} has no EOS id: assistant turns need one"
            )
        ids = [self.bos_id] if self.bos_id is not None else []
        if conv.tools:
            ids += self._tools_tag + self._sp.encode(json.dumps(conv.tools, ensure_ascii=False))
        mask = [0] * len(ids)
        for m in conv.messages:
            tag = self._tags[m["role"]]
            body_text = m["content"]
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls = json.dumps(m["tool_calls"], ensure_ascii=False)
                body_text = f"{body_text}\n{calls}" if body_text else calls
            body = self._sp.encode(body_text)
            supervised = m["role"] == "assistant"
            if supervised:
                body.append(self.eos_id)
            ids += tag + body
            mask += [0] * len(tag) + [int(supervised)] * len(body)
        return ids, mask
