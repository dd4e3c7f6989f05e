"""The pure format transforms: round trips (torch.equal), layouts against hand-built
references, and the errors they raise.

    python -m pytest -q tests/models/test_transforms.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eaft_megatron.models import padded_vocab_size
from eaft_megatron.models.transforms import (
    cut_vocab,
    fill_layer,
    merge_gated,
    merge_qkv,
    pad_vocab,
    split_gated,
    split_qkv,
    tp_shard,
    tp_unshard,
)

GEN = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=GEN)


@pytest.mark.parametrize("heads,groups,d,h", [(4, 2, 3, 5), (8, 8, 2, 4), (6, 1, 4, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_round_trip_and_layout(heads, groups, d, h, bias):
    rest = () if bias else (h,)
    q, k, v = rand(heads * d, *rest), rand(groups * d, *rest), rand(groups * d, *rest)
    qkv = merge_qkv(q, k, v, num_query_groups=groups, head_dim=d)
    assert qkv.shape == ((heads + 2 * groups) * d, *rest)
    # Reference layout: for each group g, its r query heads, then its key head, then its value.
    r = heads // groups
    ref = []
    for g in range(groups):
        ref += [q[(g * r + i) * d:(g * r + i + 1) * d] for i in range(r)]
        ref += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    assert torch.equal(qkv, torch.cat(ref))
    q2, k2, v2 = split_qkv(qkv, num_query_groups=groups, num_heads=heads, head_dim=d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_qkv_tp_split_keeps_whole_groups():
    heads, groups, d, h, tp = 8, 4, 2, 3, 2
    q, k, v = rand(heads * d, h), rand(groups * d, h), rand(groups * d, h)
    qkv = merge_qkv(q, k, v, num_query_groups=groups, head_dim=d)
    for rank in range(tp):
        qs, ks, vs = (t.chunk(tp)[rank] for t in (q, k, v))  # this rank's heads and groups
        local = merge_qkv(qs, ks, vs, num_query_groups=groups // tp, head_dim=d)
        assert torch.equal(tp_shard(qkv, rank=rank, size=tp, dim=0), local)


def test_qkv_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"k and v must have shape \(4, 5\).*k \(6, 5\)"):
        merge_qkv(rand(8, 5), rand(6, 5), rand(4, 5), num_query_groups=2, head_dim=2)
    with pytest.raises(ValueError, match="fused qkv has 10 rows; expected .* = 16"):
        split_qkv(rand(10, 3), num_query_groups=2, num_heads=4, head_dim=2)


def test_gated_round_trip_and_tp_layout():
    gate, up = rand(6, 4), rand(6, 4)
    fc1 = merge_gated(gate, up)
    assert torch.equal(fc1, torch.cat([gate, up]))
    g2, u2 = split_gated(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    for rank in range(2):  # rank i holds [gate_i; up_i] (partition_stride=2)
        local = tp_shard(fc1, rank=rank, size=2, dim=0, stride=2)
        assert torch.equal(local, merge_gated(gate.chunk(2)[rank], up.chunk(2)[rank]))
    with pytest.raises(ValueError, match=r"equal shapes; got \(6, 4\), \(5, 4\)"):
        merge_gated(gate, rand(5, 4))


def test_glm_gate_up_is_megatron_fc1():
    """GlmMLP: gate, up = gate_up_proj(x).chunk(2); out = down(up * silu(gate)). Megatron's
    gated MLP on fc1 = gate_up_proj computes the same thing, so the mapping is a rename."""
    hidden, inter = 8, 6
    gate_up, down, x = rand(2 * inter, hidden), rand(hidden, inter), rand(3, hidden)
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    hf_out = (up * F.silu(gate)) @ down.T
    g, u = split_gated(gate_up)
    assert torch.equal(merge_gated(g, u), gate_up)
    megatron_out = (F.silu(x @ g.T) * (x @ u.T)) @ down.T
    torch.testing.assert_close(megatron_out, hf_out)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dim", [0, 1])
def test_tp_shard_round_trip(stride, dim):
    full = rand(8, 12)
    for tp in (1, 2):
        shards = [tp_shard(full, rank=r, size=tp, dim=dim, stride=stride) for r in range(tp)]
        assert all(s.shape[dim] == full.shape[dim] // tp for s in shards)
        assert torch.equal(tp_unshard(shards, dim=dim, stride=stride), full)
    with pytest.raises(ValueError, match="does not split into stride 2 x tp 3"):
        tp_shard(full, rank=0, size=3, dim=0, stride=2)


def test_vocab_pad_cut_round_trip():
    emb = rand(300, 4)
    padded = pad_vocab(emb, 384)
    assert padded.shape == (384, 4) and torch.equal(padded[300:], torch.zeros(84, 4))
    assert torch.equal(cut_vocab(padded, 300), emb)
    assert pad_vocab(emb, 300) is emb
    with pytest.raises(ValueError, match="padded_vocab=200 is smaller than the vocabulary 300"):
        pad_vocab(emb, 200)
    with pytest.raises(ValueError, match="300 rows, fewer than vocab_size=301"):
        cut_vocab(emb, 301)


def test_padded_vocab_size_is_megatrons_rule():
    assert padded_vocab_size(300, 1) == 384
    assert padded_vocab_size(300, 2) == 512
    assert padded_vocab_size(256, 2) == 256
    assert padded_vocab_size(151646, 8) == 152576  # Qwen tokenizer size, tp=8
    assert padded_vocab_size(100, 1, divisible_by=64) == 128
    with pytest.raises(ValueError, match="tp=0"):
        padded_vocab_size(100, 0)


def test_fill_layer():
    assert fill_layer("decoder.layers.{}.mlp.linear_fc2.weight", 7) == \
        "decoder.layers.7.mlp.linear_fc2.weight"
    assert fill_layer("decoder.final_layernorm.weight", None) == "decoder.final_layernorm.weight"
    with pytest.raises(ValueError, match="needs a layer index"):
        fill_layer("decoder.layers.{}.x", None)
