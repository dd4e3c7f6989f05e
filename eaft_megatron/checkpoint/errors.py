"""The one error type of checkpoint handling (a leaf module: everything else imports it)."""

from __future__ import annotations

__all__ = ["CheckpointError", "UnsafeCheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt, would be overwritten, or cannot be
    converted; the message is one line naming the file and the problem. ``convert`` raises it
    under its historical name ``ConversionError`` (the same class)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled entry of a checkpoint (or its ``.metadata``) refers to something outside the
    allow-list: refused before it is unpickled."""
