"""Hugging Face tokenizers: the model's own chat template, assistant-only masks verified per token.

    tok = HFChatTokenizer("/models/Qwen3-8B")   # local directory, never downloads
    ids, mask = tok.encode_conversation(Conversation(messages))

How an assistant turn ``messages[i]`` is located, with no per-model rules:

1. ``full`` = the template rendered over the whole conversation, tokenized once (no extra
   special tokens: the template writes BOS itself when the model wants one, as
   ``apply_chat_template(tokenize=True)`` does).
2. The prompt of the turn, which must be a prefix of ``full``: ``head`` = the template over
   ``messages[:i]`` with the generation prompt (exactly what the model gets at inference, e.g.
   ``...<|im_start|>assistant\\n``). Two fallbacks, for templates that write earlier turns
   unlike the last one: when the generation prompt adds something earlier turns lack (an
   empty ``<think></think>``), ``messages[:i]`` without it plus the part of it that ``full``
   repeats (the role header, up to an added token such as ``<think>``); when the history
   itself is written differently once the chat goes on (Qwen3 drops the reasoning of turns
   before the last user turn), ``full`` up to the first generation prompt after the previous
   reply (found verbatim; it holds a special token, which no message content may contain).
   The prompt's own token ids must be a prefix of ``full``'s ids: the reply then starts on a
   token boundary and the model is trained on the prompt tokens it sees at inference.
   Otherwise the line is rejected with the reason.
3. The turn runs from there to the first *special* token of the tokenizer (``<|im_end|>``,
   ``<|eot_id|>``, ``<end_of_turn>``, or GLM-4's next role tag ``<|user|>``), which is
   supervised as the end-of-turn token. Non-special added tokens (``<think>``, ``<tool_call>``)
   are part of the reply. If the template ends the conversation with no special token after
   the last reply (GLM-4 style), the tokenizer's EOS token is appended and supervised. Text
   after the end-of-turn token (ChatML's ``\\n``) is not supervised.
4. Check: the text between the generation prompt and the end-of-turn token must end with the
   last line of the message's content (templates may drop ``<think>`` blocks of earlier turns
   or trim whitespace, so only the final line is compared; with tool calls, which follow the
   content, it must contain it), and name every tool called.

Message contents may not contain special-token strings (they would tokenize as control tokens).
Needs a fast tokenizer (``tokenizer.json``) for the character offsets.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .formats import Conversation, InvalidRecord
from .errors import ConfigError


def _last_line(content: str) -> str:
    stripped = content.strip()
    return stripped.rsplit("\n", 1)[-1].strip() if stripped else ""


def _alternation(strings: set[str]) -> re.Pattern | None:
    """A regex matching any of ``strings`` (longest first); None when there are none."""
    pattern = "|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True) if s)
    return re.compile(pattern) if pattern else None


def _tool_names(tool_calls: list[Any] | None) -> list[str]:
    names = []
    for call in tool_calls or ():
        if isinstance(call, dict):
            fn = call.get("function", call)
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.append(fn["name"])
    return names


class HFChatTokenizer:
    kind = "hf"

    def __init__(self, path: str) -> None:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - any loader failure is a set-up error
            raise ConfigError(
                f"cannot load a Hugging Face tokenizer from {path!r}: {type(e).__name__}: {e}"
            ) from e
        if not getattr(tok, "is_fast", False):
            raise ConfigError(
                f"tokenizer at {path!r} is {type(tok).__name__}, not a fast tokenizer: "
                "a tokenizer.json is needed for character offsets"
            )
        self.path = path
        self._tok = tok
        self._backend = tok.backend_tokenizer
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id
        self.pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
        special = {i: t.content for i, t in tok.added_tokens_decoder.items() if t.special}
        self._special_ids = frozenset(set(tok.all_special_ids) | set(special))
        strings = set(special.values()) | set(tok.all_special_tokens)
        self._special_re = _alternation(strings)
        self._added_re = _alternation({t.content for t in tok.added_tokens_decoder.values()})

    # -- rendering -------------------------------------------------------------------------------

    def _render(self, messages: list[dict[str, Any]], tools: list[Any] | None, *,
                add_generation_prompt: bool) -> str:
        if not self._tok.chat_template:
            raise ConfigError(
                f"tokenizer at {self.path!r} has no chat_template (tokenizer_config.json or "
                "chat_template.jinja): conversations cannot be rendered"
            )
        try:
            text = self._tok.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # noqa: BLE001 - jinja raise_exception() and friends
            raise InvalidRecord(f"chat template error: {type(e).__name__}: {e}") from None
        if not isinstance(text, str):
            raise ConfigError(f"apply_chat_template returned {type(text).__name__}, not text")
        return text

    def _check_contents(self, messages: list[dict[str, Any]]) -> None:
        if self._special_re is None:
            return
        for i, m in enumerate(messages):
            for key in ("content", "reasoning_content"):
                value = m.get(key)
                hit = self._special_re.search(value) if isinstance(value, str) else None
                if hit:
                    raise InvalidRecord(
                        f"messages[{i}].{key} ({m['role']}) contains the special token "
                        f"{hit.group()!r}, which would tokenize as a control token"
                    )

    def _prompt(self, full: str, before: list[dict[str, Any]], tools: list[Any] | None, *,
                index: int, after: int) -> str:
        """The prefix of ``full`` that prompts assistant turn ``index`` (see the docstring)."""
        head = self._render(before, tools, add_generation_prompt=True)
        if full.startswith(head):
            return head
        context = self._render(before, tools, add_generation_prompt=False)
        generation = head[len(context):] if head.startswith(context) else ""
        if generation and full.startswith(context):
            # the prompt adds what earlier turns do not have (an empty <think></think>): the
            # prompt is the part of the generation prompt the turn repeats, its header, which
            # must stop right before an added token of the generation prompt
            common = len(os.path.commonprefix([generation, full[len(context):]]))
            if common and self._added_re is not None and self._added_re.match(generation, common):
                return full[:len(context) + common]
        if generation and self._special_re is not None and self._special_re.search(generation):
            # the history is written differently once the chat goes on (Qwen3 drops reasoning
            # before the last user turn): the turn is the next generation prompt in the text;
            # it holds a special token, which no content can contain
            found = full.find(generation, after)
            if found >= 0:
                return full[:found + len(generation)]
        raise InvalidRecord(
            f"cannot locate assistant turn messages[{index}]: the chat template renders "
            f"messages[:{index}] as text that is not a prefix of the whole conversation, and "
            "its generation prompt is not found in it"
        )

    # -- encoding --------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=True).ids
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return ids

    def encode_conversation(self, conv: Conversation) -> tuple[list[int], list[int]]:
        messages, tools = conv.messages, conv.tools
        self._check_contents(messages)
        full = self._render(messages, tools, add_generation_prompt=False)
        enc = self._backend.encode(full, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        n = len(ids)
        mask = [0] * n
        after = 0  # end of the previous reply in ``full`` (characters)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self._prompt(full, messages[:i], tools, index=i, after=after)
            head_ids = self._backend.encode(head, add_special_tokens=False).ids
            start = len(head_ids)
            if ids[:start] != head_ids:
                raise InvalidRecord(
                    f"assistant turn messages[{i}] does not start on a token boundary: the "
                    f"prompt alone ends with ids {head_ids[-3:]}, inside the conversation "
                    f"{ids[max(start - 3, 0):start + 1]} (does the reply start with whitespace "
                    "that merges with the generation prompt?)"
                )
            end = start
            while end < n and ids[end] not in self._special_ids:
                end += 1
            if end == n and i != len(messages) - 1:
                raise InvalidRecord(
                    f"no end-of-turn token after assistant turn messages[{i}]: the chat template "
                    "writes no special token between it and the next message"
                )
            text = full[len(head):offsets[end][0] if end < n else len(full)]
            expected = _last_line(m["content"])
            # tool calls are written after the content: then it only has to be there
            found = expected in text if m.get("tool_calls") else text.rstrip().endswith(expected)
            if expected and not found:
                raise InvalidRecord(
                    f"assistant turn messages[{i}] renders as {text[-80:]!r} before its "
                    f"end-of-turn token, which does not end with its content {expected[-40:]!r}"
                )
            missing = [name for name in _tool_names(m.get("tool_calls")) if name not in text]
            if missing:
                raise InvalidRecord(
                    f"assistant turn messages[{i}] calls {missing} but the rendered turn "
                    f"{text[-80:]!r} does not name them"
                )
            if end == n:  # reply ends the render with no end-of-turn token: append EOS
                if self.eos_id is None:
                    raise ConfigError(
                        f"tokenizer at {self.path!r} has no eos_token and its chat template "
                        "ends the last assistant turn with no special token"
                    )
                ids = ids + [self.eos_id]
                mask.append(0)
                n += 1
            mask[start:end + 1] = [1] * (end + 1 - start)
            after = offsets[end][1] if end < len(offsets) else len(full)
        return ids, mask
