"""Constants shared by the preprocessing command, its pipeline and the dataset reader (a leaf:
imports nothing)."""

from __future__ import annotations

__all__ = ["FORMAT_VERSION", "OVERLONG"]

# Version of the prepared files (``<prefix>_summary.json``'s ``format_version``): the dataset
# reader refuses any other.
FORMAT_VERSION = 1

# What ``--overlong`` may do with a record longer than ``--seq-length``.
OVERLONG = ("truncate", "drop")
