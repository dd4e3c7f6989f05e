"""Megatron-Core models built by ``build_gpt_model`` against transformers, on real gloo groups.

    python -m pytest -q tests/models/test_megatron_models.py

One spawn of two ranks (imports dominate the cost) runs, for every tiny architecture:
  * TP=1 (both ranks are data-parallel replicas): the model's state_dict names and shapes are
    exactly ``megatron_names`` / ``megatron_shapes``; the ``hf_to_megatron`` tensors load with
    every parameter filled; logits over the real vocabulary match transformers' forward.
  * TP=2: every parameter's per-rank shape is the expected shard of the full tensor (qkv, fc1,
    embedding and output rows / tp; linear_proj and fc2 columns / tp; norms whole); the full
    tensors, sliced with ``tp_shard`` by each parameter's partition_dim / partition_stride,
    load and give the same logits (gathered over the vocabulary) as transformers.
  * PP=2: ``build_gpt_model`` as a model provider builds each stage with the expected names.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.support.launch import spawn

from tests.support.tiny_models import CASES

ATOL = 1e-4
COLUMN_PARALLEL = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight",
                   "word_embeddings.weight", "output_layer.weight")
ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def _expected_local_shape(name: str, full: tuple[int, ...], tp: int) -> tuple[int, ...]:
    if name.endswith(COLUMN_PARALLEL):
        return (full[0] // tp, *full[1:])
    if name.endswith(ROW_PARALLEL):
        return (full[0], full[1] // tp)
    return full


def _check_case(case: str, tp: int) -> dict:
    """Build, load and run one tiny architecture at the current parallel state."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from eaft_megatron.compat import cpu_transformer_config_kwargs
    from eaft_megatron.models import (
        build_gpt_model, get_arch, hf_to_megatron, megatron_names, megatron_shapes,
        padded_vocab_size,
    )
    from eaft_megatron.models.transforms import tp_shard

    from tests.support.tiny_models import build, tokens

    hf_config, hf_model, hf_state = build(case)
    arch = get_arch(hf_config)
    input_ids = tokens(hf_config.vocab_size)
    with torch.no_grad():
        reference = hf_model(input_ids).logits  # [b, s, V]

    padded = padded_vocab_size(hf_config.vocab_size, tp)
    model = build_gpt_model(hf_config, tensor_model_parallel_size=tp, transformer_impl="local",
                            **cpu_transformer_config_kwargs())
    model.eval()
    out = dict(case=case, tp=tp)
    params = dict(model.named_parameters())
    state_keys = [k for k in model.state_dict() if not k.endswith("._extra_state")]
    names = megatron_names(arch, hf_config, te=False)
    out["names_ok"] = len(set(names)) == len(names) and \
        sorted(state_keys) == sorted(names) == sorted(params)
    full_shapes = megatron_shapes(arch, hf_config, padded_vocab=padded, te=False)
    rank = parallel_state.get_tensor_model_parallel_rank()

    local, bad_shapes = {}, []
    for name, full in hf_to_megatron(arch, hf_config, hf_state.__getitem__,
                                     padded_vocab=padded, te=False):
        p = params[name]
        if getattr(p, "tensor_model_parallel", False):
            full = tp_shard(full, rank=rank, size=tp, dim=p.partition_dim,
                            stride=p.partition_stride)
        expected = _expected_local_shape(name, full_shapes[name], tp)
        if tuple(p.shape) != expected or tuple(full.shape) != expected:
            bad_shapes.append((name, tuple(p.shape), tuple(full.shape), expected))
        local[name] = full
    out["bad_shapes"] = bad_shapes
    result = model.load_state_dict(local, strict=False)
    out["unexpected"] = list(result.unexpected_keys)
    out["unfilled"] = [k for k in result.missing_keys if not k.endswith("._extra_state")]

    if tp == 1:
        # torch_dist checkpoints store megatron's sharded_state_dict keys: the TE-spec names
        # (the local spec maps its norm names to them), layers stacked along one axis.
        stored = {v.key for v in model.sharded_state_dict().values()
                  if not v.key.endswith("._extra_state")}
        te_names = {re.sub(r"^decoder\.layers\.\d+\.", "decoder.layers.", n)
                    for n in megatron_names(arch, hf_config, te=True)}
        out["te_names_ok"] = te_names == stored

    b, s = input_ids.shape
    with torch.no_grad():
        logits = model(input_ids, torch.arange(s).expand(b, s), None)  # [b, s, padded / tp]
        logits = gather_from_tensor_model_parallel_region(logits)  # [b, s, padded]
    out["logits_shape"] = tuple(logits.shape)
    out["max_err"] = (logits[..., : hf_config.vocab_size] - reference).abs().max().item()
    return out


def _pipeline_stage_names(case: str) -> dict:
    """Build this rank's pipeline stage (``build_gpt_model`` as a model provider, pre/post
    process from parallel_state) and report its parameter names and global layer numbers."""
    from eaft_megatron.compat import cpu_transformer_config_kwargs
    from eaft_megatron.models import build_gpt_model

    from tests.support.tiny_models import CASES

    config = CASES[case]()
    model = build_gpt_model(config, pipeline_model_parallel_size=2, transformer_impl="local",
                            **cpu_transformer_config_kwargs())
    names = [k for k in model.state_dict() if not k.endswith("._extra_state")]
    return dict(case=case, tp="pp2", names=names,
                layer_numbers=[layer.layer_number for layer in model.decoder.layers])


def _run(rank: int, world_size: int, cases: list[str]) -> list[dict]:
    from megatron.core import parallel_state, tensor_parallel

    from eaft_megatron.compat import install_cpu_compat

    install_cpu_compat()
    results = []
    for tp in (1, world_size):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        results += [_check_case(case, tp) for case in cases]
        torch.distributed.barrier()
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world_size)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    results += [_pipeline_stage_names(case) for case in cases]
    parallel_state.destroy_model_parallel()
    return results  # plain numbers, names and shapes: no tensors cross the process boundary


@pytest.fixture(scope="module")
def results():
    per_rank = spawn(_run, 2, sorted(CASES))
    return {(r["case"], r["tp"], rank): r for rank, rs in enumerate(per_rank) for r in rs}


@pytest.mark.parametrize("case", ["qwen2", "qwen2_tied", "glm4"])
def test_pipeline_stages(results, case):
    """Each stage holds its layers under local indices 0.. (global layer_number = offset + i);
    the first stage the embedding, the last the final norm and the output layer, which with
    tied embeddings is a copy of the embedding (named output_layer.weight) to be filled too."""
    first, last = results[(case, "pp2", 0)], results[(case, "pp2", 1)]
    assert first["layer_numbers"] == [1] and last["layer_numbers"] == [2]
    assert first["names"][0] == "embedding.word_embeddings.weight"
    assert not any(n.startswith(("decoder.final", "output")) for n in first["names"])
    assert last["names"][-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]
    assert not any(n.startswith("embedding") for n in last["names"])
    assert all(n.startswith("decoder.layers.0.") for n in first["names"][1:])
    assert ("decoder.layers.0.post_mlp_layernorm.weight" in last["names"]) == (case == "glm4")


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_megatron_matches_transformers(results, case, tp):
    from eaft_megatron.models import padded_vocab_size

    for rank in range(2):
        r = results[(case, tp, rank)]
        assert r["names_ok"], r
        assert r["bad_shapes"] == [], r["bad_shapes"]
        assert r["unexpected"] == [] and r["unfilled"] == [], r
        if tp == 1:
            assert r["te_names_ok"], r
        vocab = CASES[case]().vocab_size
        assert r["logits_shape"] == (2, 12, padded_vocab_size(vocab, tp))
        assert r["max_err"] < ATOL, f"{case} tp={tp} rank={rank}: max |logit error| {r['max_err']}"
