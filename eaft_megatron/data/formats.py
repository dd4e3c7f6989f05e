"""Input records: parse one JSONL line of any supported format into a normalised record.

    >>> parse_line(b'{"instruction": "Add", "input": "2+2", "output": "4"}', "auto")
    ('alpaca', Conversation(messages=[{'role': 'user', 'content': 'Add\\n\\n2+2'}, ...]))

=============  =====================================================================  =========
format         one line                                                               supervised
=============  =====================================================================  =========
``messages``   ``{"messages": [{"role": ..., "content": ...}, ...], "tools"?: [...]}``  assistant
``sharegpt``   ``{"conversations": [{"from": ..., "value": ...}, ...], "system"?: s}``  assistant
``alpaca``     ``{"instruction": s, "input"?: s, "output": s, "system"?: s}``           assistant
``text``       ``{"text": s}``                                                          all
``tokenized``  ``{"input_ids": [int, ...], "labels"?: [int, ...]}``                     labels
=============  =====================================================================  =========

Roles of ``messages``: ``system``, ``user``, ``assistant``, ``tool``; an assistant message may
carry ``tool_calls`` (then its content may be empty) and ``reasoning_content``, passed to the chat
template as they are. ShareGPT speakers map to roles: ``human``/``user`` -> user,
``gpt``/``assistant``/``function_call`` -> assistant, ``system`` -> system,
``observation``/``tool``/``function_response`` -> tool. Alpaca becomes system? + user
(``instruction``, then a blank line and ``input`` when present) + assistant (``output``).
``tokenized`` labels are unshifted (Hugging Face convention): each is -100 or equal to the
input id at the same position; without ``labels`` every token is supervised.

``format="auto"`` detects per line, by the first key present among ``input_ids``, ``messages``,
``conversations``, ``instruction``, ``text``. Every problem raises :class:`InvalidRecord` whose
message is the reason; the caller prefixes ``file:line``. Blank lines are not records (callers
skip them before parsing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("messages", "sharegpt", "alpaca", "text", "tokenized")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "function_call": "assistant",
    "system": "system",
    "observation": "tool", "tool": "tool", "function_response": "tool",
}
# auto-detection order: the first of these keys found decides the format
_DETECT_KEYS = (("input_ids", "tokenized"), ("messages", "messages"),
                ("conversations", "sharegpt"), ("instruction", "alpaca"), ("text", "text"))
# message keys passed through to chat templates besides role/content
_EXTRA_MESSAGE_KEYS = ("tool_calls", "reasoning_content", "name", "tool_call_id")


class InvalidRecord(ValueError):
    """A line that cannot be turned into a training example; the message is the reason."""


@dataclass
class Conversation:
    """Normalised chat: ``messages`` are dicts with ``role`` and ``content`` (+ optional keys)."""

    messages: list[dict[str, Any]]
    tools: list[Any] | None = None


@dataclass
class TextRecord:
    text: str


@dataclass
class TokenizedRecord:
    input_ids: list[int]
    labels: list[int] | None = field(default=None)


Record = Conversation | TextRecord | TokenizedRecord


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRecord(f"{what} must be a string, got {_type_name(value)} ({value!r:.60})")
    return value


def detect_format(obj: dict[str, Any]) -> str:
    """The format of a parsed JSON object (see the module docstring for the rules)."""
    for key, fmt in _DETECT_KEYS:
        if key in obj:
            return fmt
    keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
    raise InvalidRecord(
        f"unknown format: keys {keys}; expected one of 'messages', 'conversations', "
        "'instruction'+'output', 'text', 'input_ids'"
    )


def _check_messages(messages: list[dict[str, Any]], where: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRecord(f"no supervised token: {where} has no assistant turn")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise InvalidRecord(f"empty assistant turn: {where}[{i}] has empty content")


def _parse_messages(obj: dict[str, Any]) -> Conversation:
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRecord(
            f"'messages' must be a non-empty list of objects, got {_type_name(raw)} ({raw!r:.60})"
        )
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidRecord(f"messages[{i}] must be an object, got {_type_name(m)} ({m!r:.60})")
        if "role" not in m:
            raise InvalidRecord(f"messages[{i}] has no 'role'")
        role = m["role"]
        if role not in ROLES:
            raise InvalidRecord(
                f"messages[{i}] has unknown role {role!r}; expected one of {', '.join(ROLES)}"
            )
        if "content" not in m:
            raise InvalidRecord(f"messages[{i}] ({role}) has no 'content'")
        content = m["content"]
        if content is None and role == "assistant" and m.get("tool_calls"):
            content = ""
        msg = {"role": role, "content": _require_str(content, f"messages[{i}].content")}
        msg.update((k, m[k]) for k in _EXTRA_MESSAGE_KEYS if k in m)
        if "tool_calls" in msg and not isinstance(msg["tool_calls"], list):
            raise InvalidRecord(
                f"messages[{i}].tool_calls must be a list, got {_type_name(msg['tool_calls'])}"
            )
        messages.append(msg)
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRecord(f"'tools' must be a list, got {_type_name(tools)}")
    _check_messages(messages, "messages")
    return Conversation(messages, tools)


def _parse_sharegpt(obj: dict[str, Any]) -> Conversation:
    raw = obj.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise InvalidRecord(
            f"'conversations' must be a non-empty list of objects, got {_type_name(raw)} "
            f"({raw!r:.60})"
        )
    messages = []
    if obj.get("system") is not None:
        messages.append({"role": "system", "content": _require_str(obj["system"], "'system'")})
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise InvalidRecord(
                f"conversations[{i}] must be an object, got {_type_name(turn)} ({turn!r:.60})"
            )
        if "from" not in turn:
            raise InvalidRecord(f"conversations[{i}] has no 'from'")
        speaker = turn["from"]
        if speaker not in SHAREGPT_ROLES:
            raise InvalidRecord(
                f"conversations[{i}] has unknown 'from' {speaker!r}; expected one of "
                f"{', '.join(SHAREGPT_ROLES)}"
            )
        if "value" not in turn:
            raise InvalidRecord(f"conversations[{i}] ({speaker}) has no 'value'")
        content = _require_str(turn["value"], f"conversations[{i}].value")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": content})
    _check_messages(messages, "conversations")
    return Conversation(messages)


def _parse_alpaca(obj: dict[str, Any]) -> Conversation:
    for key in ("instruction", "output"):
        if key not in obj:
            raise InvalidRecord(f"alpaca record has no {key!r}")
    instruction = _require_str(obj["instruction"], "'instruction'")
    extra = obj.get("input")
    extra = "" if extra is None else _require_str(extra, "'input'")
    output = _require_str(obj["output"], "'output'")
    prompt = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    if not prompt.strip():
        raise InvalidRecord("alpaca record has empty 'instruction' and 'input'")
    messages = []
    if obj.get("system") is not None:
        messages.append({"role": "system", "content": _require_str(obj["system"], "'system'")})
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if not output.strip():
        raise InvalidRecord("empty assistant turn: 'output' is empty")
    return Conversation(messages)


def _parse_text(obj: dict[str, Any]) -> TextRecord:
    if "text" not in obj:
        raise InvalidRecord("text record has no 'text'")
    text = _require_str(obj["text"], "'text'")
    if not text.strip():
        raise InvalidRecord("no supervised token: 'text' is empty")
    return TextRecord(text)


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list):
        raise InvalidRecord(f"{what} must be a list of integers, got {_type_name(value)}")
    for i, x in enumerate(value):
        if type(x) is not int:  # bool and float are not token ids
            raise InvalidRecord(f"{what}[{i}] must be an integer, got {_type_name(x)} ({x!r})")
    return value


def _parse_tokenized(obj: dict[str, Any]) -> TokenizedRecord:
    if "input_ids" not in obj:
        raise InvalidRecord("tokenized record has no 'input_ids'")
    ids = _int_list(obj["input_ids"], "input_ids")
    if len(ids) < 2:
        raise InvalidRecord(f"input_ids must hold at least 2 tokens, got {len(ids)}")
    bad = next((i for i, x in enumerate(ids) if x < 0 or x >= 2**31 - 1), None)
    if bad is not None:
        raise InvalidRecord(f"input_ids[{bad}] = {ids[bad]} is not a valid token id (>= 0)")
    labels = obj.get("labels")
    if labels is not None:
        labels = _int_list(labels, "labels")
        if len(labels) != len(ids):
            raise InvalidRecord(
                f"labels has {len(labels)} entries but input_ids has {len(ids)}: expected equal"
            )
        for i, (x, y) in enumerate(zip(ids, labels)):
            if y != -100 and y != x:
                raise InvalidRecord(
                    f"labels[{i}] = {y} but input_ids[{i}] = {x}: each label must be -100 or "
                    "equal to the input id at the same position (unshifted, Hugging Face "
                    "convention)"
                )
        if all(y == -100 for y in labels[1:]):
            raise InvalidRecord("no supervised token: every label after the first is -100")
    return TokenizedRecord(ids, labels)


_PARSERS = {"messages": _parse_messages, "sharegpt": _parse_sharegpt, "alpaca": _parse_alpaca,
            "text": _parse_text, "tokenized": _parse_tokenized}


def parse_record(obj: Any, fmt: str = "auto") -> tuple[str, Record]:
    """Validate a decoded JSON value; return ``(format, record)``.

    ``fmt`` is ``"auto"`` or one of :data:`FORMATS`. Raises :class:`InvalidRecord`.
    """
    if not isinstance(obj, dict):
        raise InvalidRecord(f"a line must hold a JSON object, got {_type_name(obj)} ({obj!r:.60})")
    if fmt == "auto":
        fmt = detect_format(obj)
    elif fmt not in _PARSERS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {fmt!r}")
    return fmt, _PARSERS[fmt](obj)


def parse_line(raw: bytes | str, fmt: str = "auto") -> tuple[str, Record]:
    """Decode one JSONL line (UTF-8) and :func:`parse_record` it."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise InvalidRecord(f"invalid UTF-8: {e}") from None
    text = text.rstrip("\r\n")  # else an error at the end of the line points past its newline
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"column {e.pos + 1}" + (" (end of the line: cut short?)"
                                          if e.pos >= len(text.rstrip()) else "")
        raise InvalidRecord(f"invalid JSON: {e.msg} at {where}") from None
    return parse_record(obj, fmt)
