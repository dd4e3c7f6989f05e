"""GLM-4.7-Flash (Glm4MoeLiteForCausalLM: multi-latent attention + GLM-4.5 MoE) against
transformers, on real gloo groups.

    python -m pytest -q tests/models/test_glm4_moe_lite.py

A tiny random model (query latent, key/value latent with a shared rotary key, value heads of
another size than the query/key heads, interleaved rotary, sigmoid router with expert bias and
grouped top-k, shared expert, dense and MoE layers mixed, rms_norm_eps 1e-2 so that the latent
norms' own eps 1e-6 matters, one multi-token-prediction layer stored after the last) is saved by
transformers and converted once at TP=2. One spawn of 4 ranks loads that torch_dist checkpoint
at (TP, EP, PP) = (1, 1, 1), (2, 1, 1), (1, 2, 2) and (2, 2, 1): megatron-core's
``MLASelfAttention`` (local spec, ``layers.LatentAttentionCore``) must give transformers'
logits (fp32, 1e-4 of the largest logit). The models loaded at EP=2 x PP=2 and TP=2 x EP=2
are saved again and converted back: bit-exact with the source, every tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from eaft_megatron.convert import hf_to_megatron, megatron_to_hf
from tests.support.launch import spawn
from tests.support.tiny_models import read_saved
from tests.support.forward import pipeline_logits

LAYOUTS = ((1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 2, 1))  # (tp, ep, pp)
RESAVED = ((1, 2, 2), (2, 2, 1))
MTP = {"eh_proj.weight": (64, 128), "enorm.weight": (64,), "hnorm.weight": (64,),
       "self_attn.kv_b_proj.weight": (112, 16)}


def lite_config(**overrides):
    return transformers.Glm4MoeLiteConfig(**{**dict(
        architectures=["Glm4MoeLiteForCausalLM"], hidden_size=64, intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=300,
        max_position_embeddings=64, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True, rms_norm_eps=1e-2,
        n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
        moe_intermediate_size=32, n_shared_experts=1, routed_scaling_factor=1.8,
        norm_topk_prob=True, mlp_layer_types=["sparse", "dense", "sparse", "sparse"],
        num_nextn_predict_layers=1, tie_word_embeddings=False, pad_token_id=0,
        eos_token_id=1, bos_token_id=None), **overrides})


def _randomize(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif "embed" in name:
                p.copy_(0.3 * noise)
            elif name.endswith("mlp.gate.weight"):  # router: peaked, uneven routing
                p.copy_(3 * noise / p.shape[-1] ** 0.5)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))



def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


def _run(rank, world_size, ckpt, root, padded, reference):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from eaft_megatron.checkpoint import find_iteration_dir
    from eaft_megatron.checkpoint.torch_dist import load_model_weights, save_model_checkpoint
    from eaft_megatron.compat import cpu_transformer_config_kwargs, install_cpu_compat
    from eaft_megatron.convert.convert import load_hf_config
    from eaft_megatron.models import build_gpt_model, get_arch, megatron_names

    install_cpu_compat()
    hf_config = load_hf_config(Path(ckpt) / "hf")
    input_ids = _tokens(hf_config.vocab_size)
    results = []
    for tp, ep, pp in LAYOUTS:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=ep)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        model = build_gpt_model(
            hf_config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep, padded_vocab=padded, transformer_impl="local",
            **cpu_transformer_config_kwargs())
        model.eval()
        r = dict(layout=(tp, ep, pp), rank=rank,
                 attention=type(model.decoder.layers[0].self_attention).__name__)
        if (tp, ep, pp) == (1, 1, 1):
            local = [k for k in model.state_dict() if not k.endswith("_extra_state")]
            names = megatron_names(get_arch(hf_config), hf_config, te=False)
            r["names_ok"] = sorted(local) == sorted(names)
        load_model_weights([model], find_iteration_dir(ckpt))
        logits = pipeline_logits(model, input_ids)
        if logits is not None:
            err = logits[..., :hf_config.vocab_size] - reference
            r["rel_err"] = (err.abs().max() / reference.abs().max()).item()
        if (tp, ep, pp) in RESAVED:
            save_model_checkpoint([model], Path(root) / ("resaved_tp%d_ep%d_pp%d" % (tp, ep, pp)),
                                  iteration=5)
        results.append(r)
        torch.distributed.barrier()
        ps.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm4_moe_lite")
    config = lite_config()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.float32)
    _randomize(model, 0)
    model.eval()
    model.save_pretrained(root / "hf")
    (root / "hf" / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    source = read_saved(root / "hf")
    gen = torch.Generator().manual_seed(1)  # the MTP layer real checkpoints store after the last
    for leaf, shape in MTP.items():
        source[f"model.layers.{config.num_hidden_layers}.{leaf}"] = torch.randn(shape,
                                                                               generator=gen)
    save_file(source, str(root / "hf" / "model.safetensors"), metadata={"format": "pt"})
    ckpt = hf_to_megatron(root / "hf", root / "mc", tp=2, progress=False)
    with torch.no_grad():
        reference = model(_tokens(config.vocab_size)).logits
    padded = json.loads((ckpt / "eaft_megatron.json").read_text())["padded_vocab_size"]
    per_rank = spawn(_run, 4, str(ckpt), str(root), padded, reference)
    back = {}
    for layout in RESAVED:
        resaved = root / ("resaved_tp%d_ep%d_pp%d" % layout)
        # the resaved checkpoint finds its HF side (config, carried MTP tensors) by --hf-config
        out = megatron_to_hf(resaved, root / ("back_tp%d_ep%d_pp%d" % layout),
                             hf_config=ckpt / "hf", progress=False)
        back[layout] = read_saved(out)
    return dict(source=source, back=back, results=[r for rs in per_rank for r in rs])


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "tp%d_ep%d_pp%d" % t)
def test_logits_match_transformers(lite_run, layout):
    rows = [r for r in lite_run["results"] if r["layout"] == layout]
    assert len(rows) == 4 and all(r["attention"] == "MLASelfAttention" for r in rows)
    with_logits = [r for r in rows if "rel_err" in r]
    assert len(with_logits) == (4 if layout[2] == 1 else 2)
    for r in with_logits:
        assert r["rel_err"] < 1e-4, (layout, r)
    if layout == (1, 1, 1):
        assert all(r["names_ok"] for r in rows)


@pytest.mark.parametrize("layout", RESAVED, ids=lambda t: "tp%d_ep%d_pp%d" % t)
def test_round_trip_is_bit_exact(lite_run, layout):
    src, back = lite_run["source"], lite_run["back"][layout]
    assert sorted(src) == sorted(back)
    assert "model.layers.0.self_attn.kv_b_proj.weight" in src
    assert "model.layers.4.eh_proj.weight" in back  # the MTP layer came back
    for k in src:
        assert src[k].dtype == back[k].dtype and torch.equal(src[k], back[k]), k


def test_what_megatron_cannot_express_is_refused_in_one_line():
    from eaft_megatron.models import check_parallel_sizes, transformer_config_from_hf

    for overrides, message in (
            (dict(rope_interleave=False), "rope_interleave=False is not supported"),
            (dict(attention_bias=True), "attention_bias=True is not supported: megatron-core's "
                                        "multi-latent attention has no bias"),
            (dict(mlp_layer_types=["dense", "sparse", "moe", "sparse"]),
             "mlp_layer_types=['dense', 'sparse', 'moe', 'sparse'] must list 'dense' or "
             "'sparse'")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            transformer_config_from_hf(lite_config(**overrides), transformer_impl="local")
    with pytest.raises(ValueError, match=r"tensor parallel size 2 does not divide "
                                         r"kv_lora_rank \+ qk_rope_head_dim=25"):
        check_parallel_sizes(lite_config(kv_lora_rank=17), 2, 1)
    with pytest.raises(ValueError, match="q_lora_rank=None .* is not supported: megatron-core "
                                         "0.19's multi-latent attention then builds "
                                         "linear_q_proj as a fused norm"):
        transformer_config_from_hf(lite_config(q_lora_rank=None), transformer_impl="local")

