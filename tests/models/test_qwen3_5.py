"""Gated-DeltaNet hybrids (Qwen3.5) against transformers, on real gloo groups.

    python -m pytest -q tests/models/test_qwen3_5.py

Two tiny random models saved by transformers, every parameter drawn at random (zero-centred
norms, the DeltaNet's gated norm, ``A_log``, ``dt_bias`` and ``conv1d`` included; decays slow
enough that the recurrent state carries information across the 64-token chunk boundary):
``Qwen3_5ForCausalLM`` (3 DeltaNet layers + 1 gated attention, untied, a multi-token-prediction
head as the released checkpoints store it) and ``Qwen3_5ForConditionalGeneration`` (alternating
layers, tied, a vision tower, M-RoPE sections). Sequences of 80 tokens: longer than the
convolution window (4) and than one chunk of the delta rule (64).

Each is converted once (``convert hf-to-megatron --tp 2``); one spawn of two ranks loads it at
TP=1, TP=2 and PP=2 (megatron-core's ``GatedDeltaNet`` with the CPU layer's plain-PyTorch
kernels), compares the logits with transformers', and saves it again at TP=2 and at PP=2;
both saves convert back bit-exactly (vision tower and MTP head carried through). In the same
spawn, at TP=2, one DeltaNet layer shows what packed sequences do: with ``cu_seqlens`` (THD
``PackedSeqParams``, the GPU path) every document starts from a zero state; without them (the
CPU path, where the local attention takes only a dense mask) the second document sees the
first, which is why the trainer refuses packed data for these models on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from eaft_megatron.convert import ConversionError, hf_to_megatron, megatron_to_hf
from tests.support.launch import spawn
from tests.support.tiny_models import read_saved
from tests.support.forward import pipeline_logits

ATOL = 1e-4
SEQ = 80  # > conv window 4, > delta-rule chunk 64
LAYOUTS = ((1, 1), (2, 1), (1, 2))  # (tp, pp)

TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
            linear_conv_kernel_dim=4, max_position_embeddings=256, rms_norm_eps=1e-6)
CASES = {
    "qwen3_5": lambda: transformers.Qwen3_5TextConfig(
        architectures=["Qwen3_5ForCausalLM"], tie_word_embeddings=False,
        layer_types=["linear_attention"] * 3 + ["full_attention"], **TEXT),
    "qwen3_5_vl": lambda: transformers.Qwen3_5Config(
        architectures=["Qwen3_5ForConditionalGeneration"], tie_word_embeddings=True,
        text_config=dict(TEXT, layer_types=["linear_attention", "full_attention"] * 2,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              partial_rotary_factor=0.25,
                                              mrope_section=[2, 1, 1], mrope_interleaved=True)),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                           out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=16),
        image_token_id=296, video_token_id=297, vision_start_token_id=298,
        vision_end_token_id=299),
}
# What a released Qwen3.5 checkpoint stores besides the model transformers builds.
MTP_TENSORS = {"mtp.fc.weight": (64, 128), "mtp.norm.weight": (64,),
               "mtp.layers.0.self_attn.q_proj.weight": (256, 64)}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("linear_attn.norm.weight"):  # plain RMSNorm (weight ~ 1)
                p.copy_(1 + 0.3 * noise)
            elif "norm" in name:  # zero-centred: scale 1 + weight
                p.copy_(0.3 * noise)
            elif name.endswith("A_log"):  # slow decay: the state outlives a 64-token chunk
                p.copy_(-3 + 0.5 * noise)
            elif name.endswith("dt_bias"):
                p.copy_(-1 + 0.5 * noise)
            elif "embed" in name or name.endswith(".bias"):
                p.copy_(0.3 * noise)
            else:  # linear [out, in], conv1d [c, 1, w], vision patch embedding
                p.copy_(noise / p[0].numel() ** 0.5)


def build(case: str, directory: Path, seed: int = 0):
    """Save a tiny random model; return (config, model, tensors as saved)."""
    config = CASES[case]()
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32) if case == "qwen3_5" else \
        transformers.AutoModelForImageTextToText.from_config(
            config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    saved = read_saved(directory)
    if case == "qwen3_5":
        gen = torch.Generator().manual_seed(seed + 1)
        saved.update({k: torch.randn(s, generator=gen) for k, s in MTP_TENSORS.items()})
        save_file(saved, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return config, model, saved


def tokens(batch: int = 2) -> torch.Tensor:  # below the VL model's special ids
    return torch.randint(0, 290, (batch, SEQ), generator=torch.Generator().manual_seed(3))


def _packing(model) -> dict:
    """One DeltaNet layer on two documents packed into 80 tokens (30 + 50)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    gdn = model.decoder.layers[0].self_attention
    x = torch.randn(SEQ, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, 30, SEQ], dtype=torch.int32)
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=50, max_seqlen_kv=50)
    with torch.no_grad():
        alone = torch.cat([gdn(x[:30], None)[0], gdn(x[30:], None)[0]])
        packed = gdn(x, None, packed_seq_params=thd)[0]
        plain = gdn(x, None)[0]
    return dict(reset_err=(packed - alone).abs().max().item(),
                leak=(plain[30:] - alone[30:]).abs().max().item(),
                first_doc_err=(plain[:30] - alone[:30]).abs().max().item())


def _run(rank, world_size, jobs):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from eaft_megatron.compat import cpu_transformer_config_kwargs, install_cpu_compat
    from eaft_megatron.convert.convert import load_hf_config
    from eaft_megatron.checkpoint import find_iteration_dir
    from eaft_megatron.checkpoint.torch_dist import load_model_weights, save_model_checkpoint
    from eaft_megatron.models import build_gpt_model, get_arch, megatron_names

    install_cpu_compat()
    results = []
    for case, ckpt, resaved, reference in jobs:
        hf_config = load_hf_config(Path(ckpt) / "hf")
        for tp, pp in LAYOUTS:
            ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                         pipeline_model_parallel_size=pp)
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
            model = build_gpt_model(
                hf_config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                padded_vocab=reference["padded"], transformer_impl="local",
                **cpu_transformer_config_kwargs())
            model.eval()
            r = dict(case=case, layout=(tp, pp), rank=rank)
            local = [k for k in model.state_dict() if not k.endswith("_extra_state")]
            if (tp, pp) == (1, 1):
                names = megatron_names(get_arch(hf_config), hf_config, te=False)
                r["names_ok"] = sorted(local) == sorted(names) and len(set(names)) == len(names)
            load_model_weights([model], find_iteration_dir(ckpt))
            logits = pipeline_logits(model, reference["ids"])
            if logits is not None:
                err = logits[..., :hf_config.vocab_size] - reference["logits"]
                r["max_err"] = err.abs().max().item()
            if tp == 2 and case == "qwen3_5":
                r.update(_packing(model))
            if tp == 2 or pp == 2:
                save_model_checkpoint([model], Path(resaved) / f"tp{tp}pp{pp}", iteration=3)
            results.append(r)
            torch.distributed.barrier()
            ps.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    jobs, sources, largest = [], {}, {}
    for case in sorted(CASES):
        root = tmp_path_factory.mktemp(case)
        config, model, sources[case] = build(case, root / "hf")
        ckpt = hf_to_megatron(root / "hf", root / "mc", tp=2, progress=False)
        ids = tokens()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        largest[case] = logits.abs().max().item()
        padded = json.loads((ckpt / "eaft_megatron.json").read_text())["padded_vocab_size"]
        jobs.append((case, str(ckpt), str(root / "resaved"),
                     dict(ids=ids, logits=logits, padded=padded)))
    per_rank = spawn(_run, 2, jobs)
    out = {}
    for case, ckpt, resaved, _ in jobs:
        back = {}
        for layout in ("tp2pp1", "tp1pp2"):  # each save finds its HF side by --hf-config
            back[layout] = read_saved(megatron_to_hf(
                Path(resaved) / layout, Path(resaved) / f"hf_{layout}",
                hf_config=Path(ckpt) / "hf", progress=False))
        out[case] = dict(source=sources[case], back=back, largest=largest[case],
                         results=[r for rs in per_rank for r in rs if r["case"] == case])
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "tp%d_pp%d" % t)
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(runs, case, layout):
    run = runs[case]
    rows = [r for r in run["results"] if r["layout"] == layout]
    with_logits = [r for r in rows if "max_err" in r]
    assert len(with_logits) == (2 if layout[1] == 1 else 1)  # the last pipeline stage
    for r in with_logits:
        assert r["max_err"] < ATOL * run["largest"], (case, layout, r)
    if layout == (1, 1):
        assert all(r["names_ok"] for r in rows)


@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_exact(runs, case, layout):
    src, back = runs[case]["source"], runs[case]["back"][layout]
    assert sorted(src) == sorted(back)
    carried = "mtp.fc.weight" if case == "qwen3_5" else "model.visual.merger.linear_fc2.weight"
    assert carried in back
    for k in src:
        assert src[k].dtype == back[k].dtype and torch.equal(src[k], back[k]), k


def test_carried_tensors_file_says_what_it_holds(tmp_path):
    """A vision-language checkpoint with an MTP head: ``hf/extra_tensors.safetensors`` holds
    the vision tower and the MTP head unchanged, and its metadata names both."""
    from safetensors import safe_open

    _, _, saved = build("qwen3_5_vl", tmp_path / "hf")
    gen = torch.Generator().manual_seed(1)
    saved.update({k: torch.randn(s, generator=gen) for k, s in MTP_TENSORS.items()})
    save_file(saved, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    hf_to_megatron(tmp_path / "hf", tmp_path / "mc", progress=False)
    with safe_open(tmp_path / "mc" / "hf" / "extra_tensors.safetensors", "pt") as f:
        assert f.metadata()["eaft_megatron"] == (
            "HF tensors the Megatron model does not hold (vision tower, multi-token "
            "prediction), written back on export")
        carried = {n: f.get_tensor(n) for n in f.keys()}
    assert sorted(carried) == sorted(n for n in saved if n.startswith(("model.visual.", "mtp.")))
    assert any(n.startswith("mtp.") for n in carried)
    assert all(torch.equal(t, saved[n]) for n, t in carried.items())


def test_packed_documents_reset_the_deltanet_state_only_with_cu_seqlens(runs):
    rows = [r for r in runs["qwen3_5"]["results"] if "reset_err" in r]
    assert len(rows) == 2  # both TP ranks
    for r in rows:
        assert r["reset_err"] < 1e-5, r  # THD cu_seqlens: each document from a zero state
        assert r["first_doc_err"] < 1e-5, r
        assert r["leak"] > 1e-3, r  # no cu_seqlens: the second document sees the first


def test_state_crosses_the_chunk_boundary():
    """The oracle's own DeltaNet layer: the last token's output depends on the first token,
    64+ tokens back (so the logits tests exercise the state carried between chunks)."""
    config = CASES["qwen3_5"]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_(model, 0)
    layer = model.model.layers[0].linear_attn
    x = torch.randn(1, SEQ, config.hidden_size, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 0] += 1.0
    with torch.no_grad():
        change = (layer(x)[:, -1] - layer(y)[:, -1]).abs().max().item()
    assert change > 1e-3, change


# ---------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


@pytest.mark.parametrize("missing", ["linear_attn.A_log", "linear_attn.dt_bias",
                                     "linear_attn.conv1d.weight"])
def test_checkpoint_missing_deltanet_tensor(tmp_path, missing):
    src = tmp_path / "hf"
    _, _, saved = build("qwen3_5", src)
    del saved[f"model.layers.1.{missing}"]
    save_file(saved, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=rf"lacks 1 tensor.*model\.layers\.1\.{missing}"):
        hf_to_megatron(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_config_errors():
    from eaft_megatron.models import check_parallel_sizes, transformer_config_from_hf

    config = CASES["qwen3_5"]()
    with pytest.raises(ValueError, match=r"^tensor parallel size 4 does not divide "
                       r"linear_num_key_heads \(gated DeltaNet\)=2$"):
        check_parallel_sizes(config, 4, 1)
    config.layer_types = ["linear_attention", "sliding_attention", "linear_attention",
                          "full_attention"]
    with pytest.raises(ValueError, match=r"Qwen3_5ForCausalLM: layer_types cannot be expressed "
                       r"in megatron-core \(unknown layer types \['sliding_attention'\]"):
        transformer_config_from_hf(config, transformer_impl="local")
    config = CASES["qwen3_5"]()
    config.linear_num_value_heads = 3
    with pytest.raises(ValueError, match="linear_num_value_heads=3 is not a multiple"):
        transformer_config_from_hf(config, transformer_impl="local")


def test_multimodal_checkpoint_on_the_text_path(tmp_path):
    """A vision-language checkpoint whose config says Qwen3_5ForCausalLM: refused in one line
    naming tensors the text table does not consume."""
    src = tmp_path / "hf"
    build("qwen3_5_vl", src)
    raw = json.loads((src / "config.json").read_text())
    text = dict(raw["text_config"], architectures=["Qwen3_5ForCausalLM"])
    (src / "config.json").write_text(json.dumps(text))
    with pytest.raises(ConversionError, match="lacks .* Qwen3_5ForCausalLM mapping needs"):
        hf_to_megatron(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
