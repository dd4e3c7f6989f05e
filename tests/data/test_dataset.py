"""The training dataset: sample contents against loop oracles, order, resume, attention helpers."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from eaft_megatron.data import (SFTIndexedDataset, block_causal_mask, merge_cu_seqlens,
                                packed_seq_params, preprocess)

from tests.support.data import write_jsonl
from .test_pipeline import chat

SEQ = 96


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dirs):
    """``{"packed": prefix, "single": prefix}`` over the same 30 conversations."""
    root = tmp_path_factory.mktemp("prepared")
    path = write_jsonl(root / "c.jsonl", [{"messages": chat(i, turns=1 + i % 2)}
                                          for i in range(30)])
    out = {}
    for name, pack in (("packed", True), ("single", False)):
        preprocess([path], tokenizer=tokenizer_dirs["chatml"], output_prefix=root / name,
                   seq_length=SEQ, pack=pack, progress=False)
        out[name] = str(root / name)
    return out


def oracle_sample(prefix: str, stored: int, seq: int, pad_id: int) -> dict[str, list]:
    """Straight from megatron's reader, one position at a time."""
    tokens, masks = IndexedDataset(f"{prefix}_tokens"), IndexedDataset(f"{prefix}_loss_mask")
    first, last = int(tokens.document_indices[stored]), int(tokens.document_indices[stored + 1])
    ids, sup, doc, pos = [], [], [], []
    for d, k in enumerate(range(first, last)):
        ids += tokens[k].tolist()
        sup += masks[k].tolist()
        doc += [d] * len(tokens[k])
        pos += list(range(len(tokens[k])))
    n = len(ids)
    labels = [ids[i + 1] if i + 1 < n and doc[i + 1] == doc[i] and sup[i + 1] else -100
              for i in range(seq)]
    bounds = [0] + [i for i in range(1, n) if doc[i] != doc[i - 1]] + [n]
    if n < seq:
        bounds.append(seq)
    return {
        "tokens": ids + [pad_id] * (seq - n),
        "labels": labels,
        "loss_mask": [float(x != -100) for x in labels],
        "position_ids": pos + list(range(seq - n)),
        "cu_seqlens": bounds + [seq] * (seq + 1 - len(bounds)),
        "max_seqlen": max(b - a for a, b in zip(bounds, bounds[1:])),
    }


@pytest.mark.parametrize("kind", ["packed", "single"])
def test_samples_match_the_oracle(prepared, kind):
    ds = SFTIndexedDataset(prepared[kind], shuffle=False)
    assert ds.seq_length == SEQ and len(ds) == ds.num_stored
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(prepared[kind] + "_tokens")  # kept: its arrays view the mmap
    documents = [int(x) for x in index.document_indices]
    packs_with_several = 0
    for i in range(len(ds)):
        sample = ds[i]
        expected = oracle_sample(prepared[kind], i, SEQ, ds.pad_id)
        # where the sample lies in the files: its first conversation is the provenance row
        expected.update(sample_index=i, first_conversation=documents[i])
        assert {k: (v.tolist() if v.dim() else int(v)) for k, v in sample.items()} == expected
        assert sample["tokens"].dtype == sample["labels"].dtype == torch.int64
        assert sample["loss_mask"].dtype == torch.float32
        assert sample["cu_seqlens"].dtype == sample["max_seqlen"].dtype == torch.int32
        packs_with_several += int(sample["cu_seqlens"].tolist().count(0) == 1
                                  and len(set(sample["cu_seqlens"].tolist())) > 3)
    assert (packs_with_several > 0) == (kind == "packed")


def test_labels_never_cross_a_conversation_boundary(prepared):
    ds = SFTIndexedDataset(prepared["packed"], shuffle=False)
    for i in range(len(ds)):
        s = ds[i]
        starts = (s["position_ids"] == 0).nonzero().flatten()
        for start in starts[1:]:  # the token before a restart predicts nothing
            assert s["labels"][start - 1] == -100
    # even if a stored mask marked a conversation's first token (another writer)
    ones = np.ones(4, dtype=np.uint8)
    s = ds.build_sample([np.arange(4), np.arange(10, 14)], [ones, ones])
    assert s["labels"][:8].tolist() == [1, 2, 3, -100, 11, 12, 13, -100]


def test_shuffle_is_deterministic_by_seed_and_epoch(prepared):
    a = SFTIndexedDataset(prepared["single"], seed=7, num_samples=90)
    b = SFTIndexedDataset(prepared["single"], seed=7, num_samples=90)
    c = SFTIndexedDataset(prepared["single"], seed=8, num_samples=90)
    n = a.num_stored
    orders = [[a.stored_index(e * n + i) for i in range(n)] for e in range(3)]
    assert all(sorted(o) == list(range(n)) for o in orders)  # each epoch: every sample once
    assert orders[0] != orders[1] != orders[2] and orders[0] != list(range(n))
    assert orders == [[b.stored_index(e * n + i) for i in range(n)] for e in range(3)]
    assert orders[0] != [c.stored_index(i) for i in range(n)]
    assert a.epoch_order(1).tolist() == orders[1]
    tokens, _ = a.read(orders[2][5])
    assert torch.equal(a[2 * n + 5]["tokens"][:tokens[0].size], torch.from_numpy(
        tokens[0].astype(np.int64)))


def test_resume_at_a_sample_index(prepared):
    full = SFTIndexedDataset(prepared["packed"], seed=3, num_samples=50)
    resumed = SFTIndexedDataset(prepared["packed"], seed=3, num_samples=50, start_index=17)
    assert len(resumed) == 33
    for i in range(len(resumed)):
        assert torch.equal(resumed[i]["tokens"], full[17 + i]["tokens"])
    with pytest.raises(IndexError, match="index 33 out of range for 33 samples"):
        resumed[33]
    with pytest.raises(ValueError, match="start_index must be in"):
        SFTIndexedDataset(prepared["packed"], num_samples=5, start_index=6)


def test_dataloader_batches_and_packed_seq_params(prepared):
    from megatron.core.utils import _merge_cu_seqlens_across_micro_batch

    ds = SFTIndexedDataset(prepared["packed"], seed=1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["tokens"].shape == batch["labels"].shape == (3, SEQ)
    assert batch["cu_seqlens"].shape == (3, SEQ + 1) and batch["max_seqlen"].shape == (3,)
    merged = merge_cu_seqlens(batch["cu_seqlens"], SEQ)
    assert torch.equal(merged, _merge_cu_seqlens_across_micro_batch(batch["cu_seqlens"], SEQ))
    assert merged[0] == 0 and merged[-1] == 3 * SEQ and bool((merged.diff() > 0).all())
    params = packed_seq_params(batch)
    assert params.qkv_format == "thd" and torch.equal(params.cu_seqlens_q, merged)
    assert params.max_seqlen_q == int(batch["max_seqlen"].max())


def test_block_causal_mask_keeps_conversations_apart():
    cu = torch.tensor([0, 3, 5, 8, 8, 8], dtype=torch.int32)
    mask = block_causal_mask(cu, 8)
    seg = [0, 0, 0, 1, 1, 2, 2, 2]
    expected = [[not (j <= i and seg[i] == seg[j]) for j in range(8)] for i in range(8)]
    assert mask.shape == (1, 8, 8) and mask[0].tolist() == expected

    # attention over a pack with the mask == each conversation alone with a causal mask
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    packed = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~mask)
    for a, b in ((0, 3), (3, 5), (5, 8)):
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True)
        torch.testing.assert_close(packed[:, :, a:b], alone)


def test_attention_mask_option_and_longer_seq_length(prepared):
    ds = SFTIndexedDataset(prepared["packed"], seq_length=SEQ + 8, attention_mask=True)
    s = ds[0]
    assert s["tokens"].shape == (SEQ + 8,) and s["attention_mask"].shape == (1, SEQ + 8, SEQ + 8)
    assert torch.equal(s["attention_mask"], block_causal_mask(s["cu_seqlens"], SEQ + 8))
    assert s["position_ids"][-8:].tolist() != list(range(SEQ, SEQ + 8))  # padding restarts


def test_construction_errors(prepared, tmp_path):
    longest = max(int(SFTIndexedDataset(prepared["packed"], shuffle=False)[i]["cu_seqlens"][
        :-1].diff().clamp(min=0).sum()) for i in range(3))
    assert longest > 10
    with pytest.raises(ValueError, match=r"seq_length 10 is shorter than the longest stored"):
        SFTIndexedDataset(prepared["packed"], seq_length=10)
    with pytest.raises(FileNotFoundError, match="not a complete prepared dataset"):
        SFTIndexedDataset(tmp_path / "nothing")
    args = SimpleNamespace(data_path=[prepared["single"]], seq_length=SEQ, seed=5)
    assert SFTIndexedDataset.from_args(args).seed == 5
    with pytest.raises(ValueError, match="--data-path must be one prepared prefix"):
        SFTIndexedDataset.from_args(SimpleNamespace(data_path=["1", "a", "2", "b"],
                                                    seq_length=SEQ, seed=1))


def test_files_from_different_runs_are_refused(prepared, tmp_path):
    import shutil

    for suffix in ("_tokens.bin", "_tokens.idx", "_loss_mask.bin", "_loss_mask.idx",
                   "_summary.json"):
        shutil.copy(prepared["single"] + suffix, tmp_path / f"x{suffix}")
    shutil.copy(prepared["packed"] + "_loss_mask.idx", tmp_path / "x_loss_mask.idx")
    with pytest.raises(ValueError, match=r"x_loss_mask.idx: \d+ bytes on disk, the summary"):
        SFTIndexedDataset(tmp_path / "x")
