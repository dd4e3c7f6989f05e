"""Per-rank accumulation of the entropy-probability landscape (see :mod:`.landscape`): the
histogram, quadrant counts, per-conversation sums and the most conflicting positions of one
evaluation, packed into one fixed-size float64 buffer per rank for the single gather, and
unpacked and merged on the writing rank."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["QUADRANTS", "ROW", "SLOT", "SLOTS_PER_CONVERSATION", "unpack_buffers"]

# per conversation: id, supervised tokens, confident conflicts, sum of gate weights,
# evaluations (times its tokens were counted: > 1 when an evaluation cycles over the data)
ROW = 5
# per conflicting position: conversation, position of the label token in the conversation,
# most likely token, p(label), normalised entropy
SLOT = 5
SLOTS_PER_CONVERSATION = 8
QUADRANTS = ("uncertain_likely", "uncertain_unlikely", "confident_agreement",
             "confident_conflict")  # index = 2 * (entropy low) + (probability low)


@dataclass
class _Accumulator:
    bins: int
    top_k: int
    conflict_entropy: float
    conflict_prob: float
    hist: Any = None  # torch int64 [bins * bins] on the device
    quadrants: Any = None  # torch int64 [4]
    rows: list = field(default_factory=list)  # numpy [n, ROW]
    slots: list = field(default_factory=list)  # numpy [n, SLOT]

    def add(self, stats: Any, cu_seqlens: Any, first_conversation: Any) -> None:
        import torch

        b, s = cu_seqlens.shape[0], cu_seqlens.shape[1] - 1
        mask = stats.mask.reshape(b, s)
        entropy = torch.clamp(stats.entropy.reshape(b, s) / math.log(self.top_k), max=1.0)
        prob = stats.target_prob.reshape(b, s)
        device = mask.device
        cu = cu_seqlens.to(device=device, dtype=torch.int64).contiguous()
        positions = torch.arange(s, device=device).expand(b, s).contiguous()
        segment = torch.searchsorted(cu, positions, right=True) - 1  # [b, s]
        conversation = first_conversation.to(device).reshape(b, 1) + segment
        # the label at position i is the token i + 1 of the same conversation
        label_position = positions + 1 - cu.gather(1, segment)
        sel = mask.nonzero(as_tuple=True)
        e, p = entropy[sel], prob[sel]
        bins = self.bins
        cell = (torch.clamp((e * bins).long(), 0, bins - 1) * bins
                + torch.clamp((p * bins).long(), 0, bins - 1))
        hist = torch.bincount(cell, minlength=bins * bins)
        low_e, low_p = e < self.conflict_entropy, p < self.conflict_prob
        quadrants = torch.bincount(low_e.long() * 2 + low_p.long(), minlength=4)
        self.hist = hist if self.hist is None else self.hist + hist
        self.quadrants = quadrants if self.quadrants is None else self.quadrants + quadrants
        conflict = low_e & low_p
        conv = conversation[sel]
        ids, inverse = torch.unique(conv, return_inverse=True)
        sums = torch.stack([
            torch.bincount(inverse, minlength=ids.numel()).double(),
            torch.bincount(inverse, weights=conflict.double(), minlength=ids.numel()),
            torch.bincount(inverse, weights=stats.weight.reshape(b, s)[sel].double(),
                           minlength=ids.numel()),
        ], dim=1)
        rows = torch.cat([ids.double()[:, None], sums, torch.ones_like(sums[:, :1])], dim=1)
        self.rows.append(rows.cpu().numpy())
        if bool(conflict.any()):
            top = stats.top_token.reshape(b, s)[sel] if stats.top_token is not None else \
                torch.full_like(conv, -1)
            slots = torch.stack([conv.double(), label_position[sel].double(), top.double(),
                                 p.double(), e.double()], dim=1)[conflict]
            self.slots.append(slots.cpu().numpy())

    def buffer(self, capacity_rows: int) -> np.ndarray:
        """This rank's fixed-size float64 buffer: [2 + 4 + bins^2 | rows | slots]."""
        bins2 = self.bins * self.bins
        rows = _merge_rows(np.concatenate(self.rows) if self.rows else np.zeros((0, ROW)))
        slots = _best_slots(np.concatenate(self.slots) if self.slots else np.zeros((0, SLOT)))
        capacity_slots = capacity_rows * SLOTS_PER_CONVERSATION
        truncated = len(rows) > capacity_rows or len(slots) > capacity_slots
        rows, slots = rows[:capacity_rows], slots[:capacity_slots]
        out = np.zeros(6 + bins2 + capacity_rows * ROW + capacity_slots * SLOT)
        out[0], out[1] = len(rows), len(slots) + (0.5 if truncated else 0)
        if self.quadrants is not None:
            out[2:6] = self.quadrants.cpu().numpy()
            out[6:6 + bins2] = self.hist.cpu().numpy()
        o = 6 + bins2
        out[o:o + rows.size] = rows.reshape(-1)
        o += capacity_rows * ROW
        out[o:o + slots.size] = slots.reshape(-1)
        return out


def _merge_rows(rows: np.ndarray) -> np.ndarray:
    """Rows of the same conversation summed (a conversation seen in several micro-batches)."""
    if len(rows) == 0:
        return rows
    ids, inverse = np.unique(rows[:, 0], return_inverse=True)
    out = np.zeros((len(ids), ROW))
    out[:, 0] = ids
    for c in range(1, ROW):
        out[:, c] = np.bincount(inverse, weights=rows[:, c], minlength=len(ids))
    return out


def _best_slots(slots: np.ndarray) -> np.ndarray:
    """At most SLOTS_PER_CONVERSATION conflicting positions per conversation (distinct
    positions, lowest p(label) first)."""
    if len(slots) == 0:
        return slots
    order = np.lexsort((slots[:, 3], slots[:, 0]))  # by conversation, then p
    slots = slots[order]
    keep, count, seen = [], {}, set()
    for i, (conv, pos) in enumerate(slots[:, :2]):
        key = (conv, pos)
        if key in seen or count.get(conv, 0) >= SLOTS_PER_CONVERSATION:
            continue
        seen.add(key)
        count[conv] = count.get(conv, 0) + 1
        keep.append(i)
    return slots[keep]


def unpack_buffers(buffers: list[np.ndarray], bins: int, capacity_rows: int) -> dict:
    """The writer's merge of every rank's buffer: summed histogram and quadrants, rows merged
    per conversation, the best conflicting positions."""
    bins2 = bins * bins
    hist = np.zeros(bins2, dtype=np.int64)
    quadrants = np.zeros(4, dtype=np.int64)
    rows, slots, truncated = [], [], False
    for buf in buffers:
        n_rows, n_slots = int(buf[0]), int(buf[1])
        truncated |= buf[1] != n_slots
        quadrants += np.rint(buf[2:6]).astype(np.int64)
        hist += np.rint(buf[6:6 + bins2]).astype(np.int64)
        o = 6 + bins2
        rows.append(buf[o:o + n_rows * ROW].reshape(-1, ROW))
        o += capacity_rows * ROW
        slots.append(buf[o:o + n_slots * SLOT].reshape(-1, SLOT))
    return dict(hist=hist.reshape(bins, bins), quadrants=quadrants,
                rows=_merge_rows(np.concatenate(rows)), slots=_best_slots(np.concatenate(slots)),
                truncated=bool(truncated))
