"""HF <-> Megatron conversion: bit-exact round trips, resharding, logits vs transformers.

The chain that the distributed tests walk (real gloo groups, Megatron's own torch_dist I/O):

    HF --hf_to_megatron(--tp 2)--> ckpt --load at TP=2, forward, save--> ckpt_tp2
       --load at PP=2, forward, save--> ckpt_pp2 --megatron_to_hf--> HF'   (== HF, bit-exact)

and a TP=2 x PP=2 load/forward/save on 4 ranks for a second architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eaft_megatron.convert import ConversionError, hf_to_megatron, megatron_to_hf
from eaft_megatron.paths import UnsafePathError
from tests.support.launch import spawn
from tests.support.tiny_models import CASES, build, read_saved, tokens

ATOL = 1e-4


def _save_hf(case: str, directory: Path):
    config, model, _ = build(case)
    model.save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return config, model



def _assert_bit_exact(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {case: (root / case, *_save_hf(case, root / case)) for case in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_bit_exact_and_config(hf_models, tmp_path, case):
    src, config, _ = hf_models[case]
    ckpt = hf_to_megatron(src, tmp_path / "mc", tp=2, progress=False)
    meta = json.loads((ckpt / "eaft_megatron.json").read_text())
    assert meta["padded_vocab_size"] % 256 == 0 and meta["vocab_size"] == config.vocab_size
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert (ckpt / "iter_0000000" / ".metadata").is_file()
    assert (ckpt / "hf" / "config.json").is_file()
    assert (ckpt / "hf" / "tokenizer_config.json").is_file()
    out = megatron_to_hf(ckpt, tmp_path / "hf", progress=False)
    _assert_bit_exact(read_saved(src), read_saved(out))
    assert (json.loads((out / "config.json").read_text())
            == json.loads((src / "config.json").read_text()))
    assert ((out / "tokenizer_config.json").read_text()
            == (src / "tokenizer_config.json").read_text())
    assert not list(tmp_path.glob(".*tmp*")), "temporary directories left behind"


def test_bf16_export_loads_in_transformers(hf_models, tmp_path):
    import transformers

    src, config, model = hf_models["qwen3"]
    ckpt = hf_to_megatron(src, tmp_path / "mc", dtype="bf16", progress=False)
    out = megatron_to_hf(ckpt, tmp_path / "hf", progress=False, max_shard_bytes=20_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # sharded + index
    exported = read_saved(out)
    for k, v in read_saved(src).items():
        assert exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v.bfloat16()), k
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tokens(config.vocab_size)
    with torch.no_grad():
        err = (reloaded(ids).logits - model(ids).logits).abs().max().item()
    assert err < 0.5  # bf16 weights; the exact check is the bit-exact bf16 comparison above


# ---------------------------------------------------------------------------------------------
# Distributed: load a checkpoint at a TP/PP, check logits against transformers, save it again


def _forward_logits(model, input_ids, pp: int):
    """Logits [b, s, padded] gathered over TP, on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = input_ids.shape
    position_ids = torch.arange(s).expand(b, s)
    if pp == 1:
        with torch.no_grad():
            return gather_from_tensor_model_parallel_region(model(input_ids, position_ids, None))

    def forward_step(data_iterator, model):
        out = model(input_ids, position_ids, None)
        return out, lambda output: (output.sum() * 0, {"logits": output.detach()})

    collected = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
        num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return gather_from_tensor_model_parallel_region(collected[0]["logits"])


def _reshard_worker(rank, world, ckpt_in, ckpt_out, tp, pp, input_ids, reference):
    from megatron.core import parallel_state, tensor_parallel

    from eaft_megatron.checkpoint import (
        checkpoint_tensor_shapes, find_iteration_dir, load_model_weights, save_model_checkpoint,
    )
    from eaft_megatron.compat import cpu_transformer_config_kwargs, install_cpu_compat
    from eaft_megatron.convert.convert import EMBEDDING_KEY, load_hf_config
    from eaft_megatron.models import build_gpt_model

    install_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    iter_dir = find_iteration_dir(ckpt_in)
    hf_config = load_hf_config(Path(ckpt_in) / "hf")
    padded = checkpoint_tensor_shapes(iter_dir)[EMBEDDING_KEY][0][0]
    model = build_gpt_model(hf_config, padded_vocab=padded, tensor_model_parallel_size=tp,
                            pipeline_model_parallel_size=pp, transformer_impl="local",
                            **cpu_transformer_config_kwargs())
    model.eval()
    load_model_weights([model], iter_dir)
    logits = _forward_logits(model, input_ids, pp)
    err = None
    if logits is not None:
        err = (logits[..., : hf_config.vocab_size] - reference).abs().max().item()
        # and the same per-token CE through this package's loss (sft) over the real vocabulary
    save_model_checkpoint([model], Path(ckpt_out), iteration=7,
                          args=dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    if rank == 0:
        import shutil

        shutil.copytree(Path(ckpt_in) / "hf", Path(ckpt_out) / "hf")
    parallel_state.destroy_model_parallel()
    return err


def _reference(model, config):
    ids = tokens(config.vocab_size)
    with torch.no_grad():
        return ids, model(ids).logits


def test_tp2_then_pp2_resharding_and_logits(hf_models, tmp_path):
    src, config, model = hf_models["glm4"]
    ids, ref = _reference(model, config)
    ckpt = hf_to_megatron(src, tmp_path / "converted", tp=2, progress=False)
    errs = spawn(_reshard_worker, 2, str(ckpt), str(tmp_path / "tp2"), 2, 1, ids, ref)
    assert all(e is not None and e < ATOL for e in errs), errs
    errs = spawn(_reshard_worker, 2, str(tmp_path / "tp2"), str(tmp_path / "pp2"), 1, 2, ids, ref)
    assert errs[0] is None and errs[1] is not None and errs[1] < ATOL, errs
    assert (tmp_path / "pp2" / "latest_checkpointed_iteration.txt").read_text() == "7"
    for ckpt_dir in ("tp2", "pp2"):  # trainer-style checkpoints of another iteration
        out = megatron_to_hf(tmp_path / ckpt_dir, tmp_path / f"hf_{ckpt_dir}", progress=False)
        _assert_bit_exact(read_saved(src), read_saved(out))


def test_tp2_pp2_on_four_ranks(hf_models, tmp_path):
    src, config, model = hf_models["qwen2_tied"]  # tied (copy on the last stage), q/k/v bias
    ids, ref = _reference(model, config)
    ckpt = hf_to_megatron(src, tmp_path / "converted", tp=2, pp=2, progress=False)
    errs = spawn(_reshard_worker, 4, str(ckpt), str(tmp_path / "tp2pp2"), 2, 2, ids, ref)
    assert [e is None for e in errs] == [True, True, False, False], errs
    assert max(errs[2:]) < ATOL, errs
    out = megatron_to_hf(tmp_path / "tp2pp2", tmp_path / "hf", progress=False)
    _assert_bit_exact(read_saved(src), read_saved(out))


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error and nothing written


def test_errors_leave_nothing_behind(hf_models, tmp_path):
    src, config, _ = hf_models["qwen2"]
    out = tmp_path / "out"

    def fails(match, **kw):
        args = dict(hf_dir=src, out=out, progress=False)
        args.update(kw)
        with pytest.raises((ConversionError, ValueError), match=match):
            hf_to_megatron(**args)
        assert not out.exists() or not any(out.iterdir())
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left"

    fails("divide", tp=3)  # 4 heads / 2 query groups
    (tmp_path / "empty").mkdir()
    fails("no config.json", hf_dir=tmp_path / "empty")

    bad = tmp_path / "unknown"
    bad.mkdir()
    raw = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "architectures": ["LlamaForCausalLM"],
                                                 "model_type": "llama"}))
    fails("Qwen2ForCausalLM", hf_dir=bad)  # the message lists the supported architectures

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    save_file({**tensors, "model.layers.0.mlp.extra.weight": torch.zeros(2)},
              extra / "model.safetensors")
    fails("not consumed.*extra", hf_dir=extra)
    del tensors["model.layers.1.self_attn.q_proj.bias"]
    save_file(tensors, extra / "model.safetensors")
    fails("lacks 1 tensor.*q_proj.bias", hf_dir=extra)
    (extra / "model.safetensors").write_bytes(b"not a safetensors file")
    fails("cannot read", hf_dir=extra)

    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UnsafePathError, match="not empty"):
        hf_to_megatron(src, out, progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    hf_to_megatron(src, out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "iter_0000000").is_dir()


def test_megatron_side_errors(hf_models, tmp_path):
    src, _, _ = hf_models["qwen3"]
    with pytest.raises(ConversionError, match="does not exist"):
        megatron_to_hf(tmp_path / "missing", tmp_path / "o", progress=False)
    ckpt = hf_to_megatron(src, tmp_path / "mc", progress=False)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("banana")
    with pytest.raises(ConversionError, match="corrupt"):
        megatron_to_hf(ckpt, tmp_path / "o", progress=False)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("0")
    import shutil

    shutil.rmtree(ckpt / "hf")
    with pytest.raises(ConversionError, match="--hf-config"):
        megatron_to_hf(ckpt, tmp_path / "o", progress=False)
    out = megatron_to_hf(ckpt, tmp_path / "o", hf_config=src, progress=False)
    _assert_bit_exact(read_saved(src), read_saved(out))
    assert not (tmp_path / "o2").exists()
