"""Errors shared by the data modules (a leaf: imports nothing), so that the tokenizer factory
and the chat tokenizers it loads do not import each other."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(RuntimeError):
    """A problem with the set-up (tokenizer, options), not with one line: never skipped."""
