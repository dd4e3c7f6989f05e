import pytest

from eaft_megatron.data import Packer


def pack_all(lengths, **kw):
    packer = Packer(**kw)
    packs = [p for n in lengths for p in packer.add(n, n)]
    return packs + packer.flush()


def test_first_fit_fills_earlier_packs():
    # next-fit would give [60], [50, 30], [40]
    assert pack_all([60, 50, 30, 40], capacity=100) == [[60, 30], [50, 40]]


def test_window_emits_the_fullest_pack_and_full_packs_at_once():
    assert pack_all([80, 90, 70, 5], capacity=100, max_open=2) == [[90], [80, 5], [70]]
    packer = Packer(capacity=10)
    assert packer.add(4, "a") == [] and packer.add(5, "b") == [["a", "b"]]  # 1 left: closed
    assert packer.add(10, "c") == [["c"]] and packer.flush() == []


def test_never_splits_and_keeps_everything():
    lengths = [(i * 37) % 90 + 2 for i in range(500)]
    packs = pack_all(lengths, capacity=128)
    assert sorted(n for p in packs for n in p) == sorted(lengths)
    assert all(sum(p) <= 128 for p in packs)
    lower_bound = -(-sum(lengths) // 128)
    assert len(packs) <= 1.05 * lower_bound  # first-fit over a window: nearly optimal here


def test_bad_lengths():
    with pytest.raises(ValueError, match=r"item length must be in \[1, 8\], got 9"):
        Packer(capacity=8).add(9, None)
    with pytest.raises(ValueError, match="capacity must be >= 2 tokens, got 1"):
        Packer(capacity=1)
