"""MoE conversion: every missing tensor (dense or expert ``linear_fc1`` included) is a one-line
error naming it, in both directions, and nothing is written.

The Megatron-side loader reads each SwiGLU ``linear_fc1`` straight into its parameter (the
two halves of megatron's ShardedTensorFactory); those parameters are checked against the
checkpoint's metadata like every other one, before any data is read.
"""

from __future__ import annotations

import pickle
import shutil

import pytest
from safetensors.torch import save_file

from eaft_megatron.checkpoint import find_iteration_dir, read_checkpoint_metadata
from eaft_megatron.convert import ConversionError, hf_to_megatron, megatron_to_hf
from tests.support.tiny_models import build_moe

# Qwen3-MoE tiny model: layer 1 dense (its fc1 a plain SwiGLU), layers 0/2/3 routed experts
# (stacked [experts, 2 x ffn, hidden] in torch_dist).
DENSE_FC1 = "decoder.layers.1.mlp.linear_fc1.weight"
EXPERT_FC1 = "decoder.layers.2.mlp.experts.experts.linear_fc1.weight"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    build_moe("qwen3_moe", root / "hf")
    return root / "hf", hf_to_megatron(root / "hf", root / "mc", progress=False)


def _drop_from_checkpoint(ckpt, dst, key):
    """A copy of ``ckpt`` whose torch_dist metadata no longer lists ``key``."""
    shutil.copytree(ckpt, dst)
    iter_dir = find_iteration_dir(dst)
    meta = read_checkpoint_metadata(iter_dir)
    assert key in meta.state_dict_metadata
    del meta.state_dict_metadata[key]
    meta.storage_data = {k: v for k, v in meta.storage_data.items() if k.fqn != key}
    (iter_dir / ".metadata").write_bytes(pickle.dumps(meta))
    return dst


@pytest.mark.parametrize("key", [DENSE_FC1, EXPERT_FC1,
                                 "decoder.layers.0.mlp.experts.experts.linear_fc2.weight",
                                 "decoder.layers.3.mlp.router.weight"])
def test_checkpoint_missing_tensor_is_named(converted, tmp_path, key):
    _, ckpt = converted
    broken = _drop_from_checkpoint(ckpt, tmp_path / "broken", key)
    with pytest.raises(ConversionError) as e:
        megatron_to_hf(broken, tmp_path / "out", progress=False)
    message = str(e.value)
    assert "\n" not in message and "lacks 1 tensor" in message and repr(key) in message
    assert not (tmp_path / "out").exists()


def test_checkpoint_wrong_shape_is_named(converted, tmp_path):
    _, ckpt = converted
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    iter_dir = find_iteration_dir(broken)
    meta = read_checkpoint_metadata(iter_dir)
    entry = meta.state_dict_metadata[EXPERT_FC1]
    entry.size = type(entry.size)((4, *entry.size[1:]))  # 4 experts stored, 8 expected
    (iter_dir / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(ConversionError, match=rf"'{EXPERT_FC1}' has shape \(4, 64, 64\), the "
                                              r"model expects \(8, 64, 64\)"):
        megatron_to_hf(broken, tmp_path / "out", progress=False)


@pytest.mark.parametrize("missing", ["model.layers.2.mlp.experts.5.gate_proj.weight",
                                     "model.layers.0.mlp.experts.7.up_proj.weight",
                                     "model.layers.1.mlp.up_proj.weight"])
def test_hf_missing_tensor_is_named(converted, tmp_path, missing):
    from tests.support.tiny_models import read_saved

    src, _ = converted
    broken = tmp_path / "hf"
    broken.mkdir()
    shutil.copy(src / "config.json", broken / "config.json")
    tensors = read_saved(src)
    del tensors[missing]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ConversionError) as e:
        hf_to_megatron(broken, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value) and "lacks 1 tensor(s)" in str(e.value)
    assert repr(missing) in str(e.value)
    assert not (tmp_path / "out").exists()
