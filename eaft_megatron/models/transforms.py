"""Pure tensor format transforms between Hugging Face and Megatron-Core layouts.

No process groups, no I/O, no global state: every function takes full tensors and returns new
tensors (or views, where said), and never mutates its inputs. Each ``merge_*`` has a ``split_*``
inverse, tested for ``torch.equal`` round trips in ``tests/models/test_transforms.py``.

    qkv = merge_qkv(q, k, v, num_query_groups=G, head_dim=d)   # [G*(r+2)*d, h]
    q, k, v = split_qkv(qkv, num_query_groups=G, num_heads=G*r, head_dim=d)
    fc1 = merge_gated(gate, up)                                 # [2*I, h] = [gate; up]
    shard = tp_shard(fc1, rank=1, size=2, dim=0, stride=2)      # [gate_1; up_1]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "cut_vocab",
    "fill_layer",
    "group_qkvz_ba",
    "merge_gated",
    "merge_qkv",
    "merge_qkv_gate",
    "pad_vocab",
    "split_gated",
    "split_qkv",
    "split_qkv_gate",
    "tp_shard",
    "tp_unshard",
    "ungroup_qkvz_ba",
]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def fill_layer(template: str, layer: int | None) -> str:
    """``"decoder.layers.{}.mlp.linear_fc2.weight"`` -> ``"decoder.layers.3.mlp..."``.

    A template without ``{}`` is a whole-model name and needs ``layer=None``.
    """
    if "{}" in template:
        if layer is None:
            raise ValueError(f"name template {template!r} needs a layer index")
        return template.format(layer)
    if layer is not None:
        raise ValueError(f"name {template!r} has no layer placeholder but got layer={layer}")
    return template


# --- fused QKV per query group ---------------------------------------------------------------


def merge_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_query_groups: int, head_dim: int
) -> torch.Tensor:
    """Megatron's fused QKV from separate q/k/v weights ([out, h]) or biases ([out]).

    Shapes: q [G*r*d, *rest], k and v [G*d, *rest] -> [G*(r+2)*d, *rest], laid out group by
    group as ``[q_g (r*d rows); k_g (d rows); v_g (d rows)]`` for g = 0..G-1. Tensor parallelism
    then splits whole groups along dim 0, which is why ``G % tp == 0`` is required.
    """
    g, d = num_query_groups, head_dim
    rest = _shape(q)[1:]
    if _shape(k) != (g * d, *rest) or _shape(v) != (g * d, *rest):
        raise ValueError(
            f"k and v must have shape {(g * d, *rest)} (num_query_groups={g} x head_dim={d}, "
            f"trailing dims of q {rest}); got k {_shape(k)}, v {_shape(v)}"
        )
    if q.shape[0] % (g * d):
        raise ValueError(
            f"q has {q.shape[0]} rows, not a multiple of num_query_groups x head_dim = {g * d}"
        )
    r = q.shape[0] // (g * d)  # query heads per group
    merged = torch.cat(
        [q.reshape(g, r * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1
    )  # [G, (r+2)*d, *rest]
    return merged.reshape(g * (r + 2) * d, *rest)


def split_qkv(
    qkv: torch.Tensor, *, num_query_groups: int, num_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_qkv`: [G*(r+2)*d, *rest] -> q [G*r*d], k [G*d], v [G*d]."""
    g, d = num_query_groups, head_dim
    if num_heads % g:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_query_groups={g}")
    r = num_heads // g
    rest = _shape(qkv)[1:]
    if qkv.shape[0] != g * (r + 2) * d:
        raise ValueError(
            f"fused qkv has {qkv.shape[0]} rows; expected num_query_groups x (heads per group + 2)"
            f" x head_dim = {g} x {r + 2} x {d} = {g * (r + 2) * d}"
        )
    grouped = qkv.reshape(g, (r + 2) * d, *rest)
    q, k, v = torch.split(grouped, [r * d, d, d], dim=1)
    return (
        q.reshape(g * r * d, *rest).contiguous(),
        k.reshape(g * d, *rest).contiguous(),
        v.reshape(g * d, *rest).contiguous(),
    )


def merge_qkv_gate(
    q_gate: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_query_groups: int,
    head_dim: int
) -> torch.Tensor:
    """Megatron's fused QKV of gated attention (``attention_output_gate``) from HF's q_proj,
    which holds each head's queries followed by its output gate (``[q_h; gate_h]``, head by
    head), and k_proj / v_proj.

    Shapes: q_gate [G*r*2d, *rest], k and v [G*d, *rest] -> [G*(2r+2)*d, *rest], laid out
    group by group as ``[q_g (r*d rows); gate_g (r*d rows); k_g (d); v_g (d)]``.
    """
    g, d = num_query_groups, head_dim
    rest = _shape(q_gate)[1:]
    if q_gate.shape[0] % (2 * g * d):
        raise ValueError(f"q_proj has {q_gate.shape[0]} rows, not a multiple of 2 x "
                         f"num_query_groups x head_dim = {2 * g * d}")
    r = q_gate.shape[0] // (2 * g * d)
    heads = q_gate.reshape(g, r, 2, d, *rest)  # [group, head in group, (q, gate), d]
    q = heads[:, :, 0].reshape(g * r * d, *rest)
    gate = heads[:, :, 1].reshape(g, r * d, *rest)
    qkv = merge_qkv(q, k, v, num_query_groups=g, head_dim=d).reshape(g, (r + 2) * d, *rest)
    merged = torch.cat([qkv[:, : r * d], gate, qkv[:, r * d:]], dim=1)  # [G, (2r+2)*d, *rest]
    return merged.reshape(g * (2 * r + 2) * d, *rest)


def split_qkv_gate(
    qkv: torch.Tensor, *, num_query_groups: int, num_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_qkv_gate`: [G*(2r+2)*d, *rest] -> q_proj [G*r*2d] (queries and
    gate interleaved head by head), k [G*d], v [G*d]."""
    g, d = num_query_groups, head_dim
    if num_heads % g:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_query_groups={g}")
    r = num_heads // g
    rest = _shape(qkv)[1:]
    if qkv.shape[0] != g * (2 * r + 2) * d:
        raise ValueError(
            f"gated fused qkv has {qkv.shape[0]} rows; expected num_query_groups x (2 x heads "
            f"per group + 2) x head_dim = {g} x {2 * r + 2} x {d} = {g * (2 * r + 2) * d}")
    q, gate, k, v = torch.split(qkv.reshape(g, (2 * r + 2) * d, *rest), [r * d, r * d, d, d],
                                dim=1)
    q_gate = torch.stack([q.reshape(g, r, d, *rest), gate.reshape(g, r, d, *rest)], dim=2)
    return (q_gate.reshape(g * r * 2 * d, *rest).contiguous(),
            k.reshape(g * d, *rest).contiguous(), v.reshape(g * d, *rest).contiguous())


# --- gated MLP (SwiGLU) ----------------------------------------------------------------------


def ungroup_qkvz_ba(
    qkvz: torch.Tensor, ba: torch.Tensor, *, key_heads: int, key_dim: int, value_heads: int,
    value_dim: int
) -> torch.Tensor:
    """Megatron's DeltaNet ``in_proj`` (``[q; k; v; z; b; a]``, each over all heads) from
    Qwen3-Next's fused projections, which group everything by key head: ``in_proj_qkvz`` is,
    per key head g, ``[q_g (dk); k_g (dk); v_g (r*dv); z_g (r*dv)]`` and ``in_proj_ba`` is
    ``[b_g (r); a_g (r)]``, with r = value heads per key head (value head g*r + j).

    Shapes: qkvz [Hk*(2dk + 2r*dv), *rest], ba [Hk*2r, *rest] -> [2Hk*dk + 2Hv*dv + 2Hv, *rest].
    """
    hk, dk, hv, dv = key_heads, key_dim, value_heads, value_dim
    if hv % hk:
        raise ValueError(f"{hv} value heads are not a multiple of {hk} key heads")
    r, rest = hv // hk, _shape(qkvz)[1:]
    per = qkvz.reshape(hk, 2 * dk + 2 * r * dv, *rest)
    q, k, v, z = torch.split(per, [dk, dk, r * dv, r * dv], dim=1)
    b, a = torch.split(ba.reshape(hk, 2 * r, *rest), [r, r], dim=1)
    return torch.cat([x.reshape(-1, *rest) for x in (q, k, v, z, b, a)], dim=0)


def group_qkvz_ba(
    in_proj: torch.Tensor, *, key_heads: int, key_dim: int, value_heads: int, value_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`ungroup_qkvz_ba`: (in_proj_qkvz, in_proj_ba), contiguous."""
    hk, dk, hv, dv = key_heads, key_dim, value_heads, value_dim
    r, rest = hv // hk, _shape(in_proj)[1:]
    sizes = [hk * dk, hk * dk, hv * dv, hv * dv, hv, hv]
    q, k, v, z, b, a = (x.reshape(hk, -1, *rest) for x in torch.split(in_proj, sizes, dim=0))
    qkvz = torch.cat([q, k, v, z], dim=1).reshape(-1, *rest).contiguous()
    return qkvz, torch.cat([b, a], dim=1).reshape(-1, *rest).contiguous()


def merge_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Megatron's ``linear_fc1`` for a gated MLP: ``[gate; up]``, both [I, *rest] -> [2I, *rest].

    GLM's ``gate_up_proj`` is already this tensor. Under tensor parallelism rank i holds
    ``[gate_i; up_i]`` (``partition_stride=2``, see :func:`tp_shard`), not a contiguous slice.
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have equal shapes; got {_shape(gate)}, {_shape(up)}")
    return torch.cat([gate, up], dim=0)


def split_gated(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_gated`: [2I, *rest] -> (gate [I], up [I]) as contiguous copies."""
    if fc1.shape[0] % 2:
        raise ValueError(f"gated linear_fc1 must have an even number of rows; got {_shape(fc1)}")
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


# --- vocabulary padding ----------------------------------------------------------------------


def pad_vocab(t: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Pad an embedding / output weight [V, h] with zero rows to [padded_vocab, h].

    Zero output rows give padded tokens a logit of exactly 0; the real vocabulary is unchanged.
    Returns ``t`` itself when no padding is needed.
    """
    vocab = t.shape[0]
    if padded_vocab < vocab:
        raise ValueError(f"padded_vocab={padded_vocab} is smaller than the vocabulary {vocab}")
    if padded_vocab == vocab:
        return t
    return torch.cat([t, t.new_zeros(padded_vocab - vocab, *t.shape[1:])], dim=0)


def cut_vocab(t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop padding rows: [padded, h] -> [vocab_size, h] (a contiguous view of ``t``)."""
    if t.shape[0] < vocab_size:
        raise ValueError(f"tensor has {t.shape[0]} rows, fewer than vocab_size={vocab_size}")
    return t[:vocab_size]


# --- tensor-parallel slicing (pure: one full tensor in, one rank's slice out) ----------------


def tp_shard(full: torch.Tensor, *, rank: int, size: int, dim: int,
             stride: int = 1) -> torch.Tensor:
    """The slice of ``full`` that tensor-parallel rank ``rank`` of ``size`` holds.

    Megatron's rule (``partition_dim`` / ``partition_stride`` attributes of its parallel
    parameters): cut ``dim`` into ``stride`` equal blocks, cut each block into ``size`` chunks,
    and give rank i chunk i of every block. ``stride=2`` is the gated ``linear_fc1``
    ([gate; up] -> [gate_i; up_i]); QKV, embeddings and row-parallel weights use ``stride=1``.
    """
    n = full.shape[dim]
    if not 0 <= rank < size:
        raise ValueError(f"rank={rank} is not in [0, {size})")
    if n % (size * stride):
        raise ValueError(
            f"dim {dim} of size {n} does not split into stride {stride} x tp {size} equal chunks"
        )
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in blocks], dim=dim).contiguous()


def tp_unshard(shards: Sequence[torch.Tensor], *, dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`tp_shard`: the full tensor from every rank's slice, in rank order."""
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([p[j] for j in range(stride) for p in pieces], dim=dim)
