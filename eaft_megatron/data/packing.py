"""Pack variable-length conversations into sequences of at most ``capacity`` tokens.

    packer = Packer(capacity=4096)
    for length, item in conversations:
        for pack in packer.add(length, item):   # zero or one finished pack: list of items
            write(pack)
    for pack in packer.flush():
        write(pack)

Streaming first-fit over a bounded window of open packs: each conversation goes into the
oldest open pack with room for it, else into a new one; when more than ``max_open`` packs are
open, the fullest is emitted. A conversation is never split (over-long ones are truncated or
dropped before packing). Memory is ``max_open * capacity`` tokens; the result depends only on
the input order, so it is deterministic. With a window of 32 the packs are typically > 95% full
for chat data whose conversations are much shorter than ``capacity``.
"""

from __future__ import annotations

from typing import Any


class Packer:
    def __init__(self, *, capacity: int, max_open: int = 32) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2 tokens, got {capacity}")
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.capacity = capacity
        self.max_open = max_open
        self._open: list[list[Any]] = []  # [free tokens, items]

    def add(self, length: int, item: Any) -> list[list[Any]]:
        """Place one item; return the packs this closed (each a list of items, in order)."""
        if not 0 < length <= self.capacity:
            raise ValueError(f"item length must be in [1, {self.capacity}], got {length}")
        for i, pack in enumerate(self._open):
            if pack[0] >= length:
                pack[0] -= length
                pack[1].append(item)
                if pack[0] < 2:  # no conversation (>= 2 tokens) fits any more
                    return [self._open.pop(i)[1]]
                return []
        self._open.append([self.capacity - length, [item]])
        if self.capacity - length < 2:
            return [self._open.pop()[1]]
        if len(self._open) > self.max_open:
            fullest = min(range(len(self._open) - 1), key=lambda j: self._open[j][0])
            return [self._open.pop(fullest)[1]]
        return []

    def flush(self) -> list[list[Any]]:
        """Close every open pack (in the order they were opened)."""
        packs = [pack[1] for pack in self._open]
        self._open = []
        return packs
