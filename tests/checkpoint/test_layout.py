"""The checkpoint directory layout (``eaft_megatron/checkpoint/layout.py``): pure path logic on
hand-made directories, checked against the layout Megatron-LM writes (tracker text, 7-digit
iteration directories, torch_dist's ``.metadata`` written last).

    python -m pytest -q tests/checkpoint/test_layout.py
"""

from __future__ import annotations

import pytest

from eaft_megatron.checkpoint import (
    CONVERTED_MARK,
    TRACKER,
    CheckpointError,
    complete_iterations,
    find_hf_dir,
    find_iteration_dir,
    is_complete,
    is_converted,
    iteration_dir_name,
    latest_complete,
    read_tracker,
    write_tracker,
)


def _iteration(root, it: int, *, complete: bool = True):
    d = root / f"iter_{it:07d}"  # Megatron-LM's own spelling, written out independently here
    d.mkdir(parents=True)
    (d / (".metadata" if complete else "__0_0.distcp")).write_bytes(b"")
    return d


def test_names_and_tracker(tmp_path):
    assert TRACKER == "latest_checkpointed_iteration.txt"
    assert iteration_dir_name(7) == "iter_0000007" and iteration_dir_name("release") == "release"
    assert read_tracker(tmp_path) is None
    write_tracker(tmp_path, 12)
    assert (tmp_path / TRACKER).read_text() == "12" and read_tracker(tmp_path) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == [TRACKER]  # no temporary left
    (tmp_path / TRACKER).write_text("release\n")
    assert read_tracker(tmp_path) == "release"
    (tmp_path / TRACKER).write_text("banana")
    with pytest.raises(CheckpointError, match="corrupt .*'banana' is not an iteration number"):
        read_tracker(tmp_path)


def test_completeness_and_latest(tmp_path):
    _iteration(tmp_path, 2)
    _iteration(tmp_path, 4, complete=False)  # a save killed half-way
    legacy = tmp_path / "iter_0000006" / "mp_rank_00"
    legacy.mkdir(parents=True)
    (legacy / "model_optim_rng.pt").write_bytes(b"")
    assert complete_iterations(tmp_path) == [2, 6]
    assert is_complete(tmp_path / "iter_0000002") and not is_complete(tmp_path / "iter_0000004")
    with pytest.raises(CheckpointError, match=r"iterations \[2, 6\]\) but no latest_checkpointed"):
        latest_complete(tmp_path)  # complete iterations without a tracker: never start over
    write_tracker(tmp_path, 4)
    with pytest.raises(CheckpointError, match="names iteration 4, but .*missing or incomplete"):
        latest_complete(tmp_path)
    write_tracker(tmp_path, 2)
    assert latest_complete(tmp_path) == 2 and latest_complete(None) is None
    assert latest_complete(tmp_path / "nothing") is None


def test_find_iteration_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        find_iteration_dir(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt"):
        find_iteration_dir(tmp_path)
    two = _iteration(tmp_path, 2)
    _iteration(tmp_path, 3, complete=False)
    write_tracker(tmp_path, 2)
    assert find_iteration_dir(tmp_path) == two
    assert find_iteration_dir(two) == two  # pointed at the iteration directory itself
    with pytest.raises(CheckpointError, match=r"iter_0000003 is missing or incomplete"):
        find_iteration_dir(tmp_path, 3)
    with pytest.raises(CheckpointError, match="iter_0000009 is missing"):
        find_iteration_dir(tmp_path, 9)


def test_find_hf_dir_one_rule(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for root in (b, c):
        (root / "hf").mkdir(parents=True)
        (root / "hf" / "config.json").write_text("{}")
    a.mkdir()
    (a / "hf").mkdir()  # an hf/ without config.json does not count
    assert find_hf_dir(a, None, b, c) == b / "hf"  # the first root that has one
    assert find_hf_dir(a, None) is None
    assert find_hf_dir(a, hf_config=c / "hf") == c / "hf"  # --hf-config wins
    for given, why in ((a / "hf", "no config.json there"), (tmp_path / "x", "does not exist"),
                       (b / "hf" / "config.json", "is not a directory")):
        with pytest.raises(CheckpointError, match=f"--hf-config {given}: {why}"):
            find_hf_dir(b, hf_config=given)


def test_converted_marker(tmp_path):
    assert not is_converted(tmp_path)
    (tmp_path / CONVERTED_MARK).write_text("{}")
    assert CONVERTED_MARK == "eaft_megatron.json" and is_converted(tmp_path)
