"""Qwen3.5-MoE and Qwen3-Next (gated-DeltaNet hybrids + routed experts + gated shared expert)
against transformers, on real gloo groups with expert parallelism.

    python -m pytest -q tests/models/test_qwen3_5_moe.py

Two tiny random models saved by transformers (experts one tensor per expert, as
``save_pretrained`` writes them): ``Qwen3_5MoeForCausalLM`` (3 DeltaNet layers + 1 gated
attention, untied) and ``Qwen3_5MoeForConditionalGeneration`` (alternating layers, tied, a vision
tower carried through), and ``Qwen3NextForCausalLM`` (fused, key-head-grouped ``in_proj_qkvz`` /
``in_proj_ba``; top-k probabilities not renormalised; layer 1 dense via ``mlp_only_layers``).
8 experts, top-2 from a peaked router, a shared expert with
its sigmoid gate; DeltaNet decays slow enough that the state crosses the 64-token chunk; 80-token
sequences (longer than the convolution window and one chunk). Each is converted once at TP=2;
one spawn of 4 ranks loads all three at (TP, EP, PP) = (1, 1, 1), (2, 1, 1) and (1, 2, 2): the logits
must equal transformers' (fp32, 1e-4 of the largest logit). The EP=2 x PP=2 model is saved again
(each rank writing its experts) and converted back: bit-exact with the source, every tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from eaft_megatron.convert import hf_to_megatron, megatron_to_hf
from tests.support.launch import spawn
from tests.support.tiny_models import read_saved
from tests.support.forward import pipeline_logits

SEQ = 80
LAYOUTS = ((1, 1, 1), (2, 1, 1), (1, 2, 2))  # (tp, ep, pp)
TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
            linear_conv_kernel_dim=4, max_position_embeddings=256, rms_norm_eps=1e-6,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, router_aux_loss_coef=0.001)
CASES = {
    "text": lambda: transformers.Qwen3_5MoeTextConfig(
        architectures=["Qwen3_5MoeForCausalLM"], tie_word_embeddings=False,
        layer_types=["linear_attention"] * 3 + ["full_attention"], **TEXT),
    "vl": lambda: transformers.Qwen3_5MoeConfig(
        architectures=["Qwen3_5MoeForConditionalGeneration"], tie_word_embeddings=True,
        text_config=dict(TEXT, layer_types=["linear_attention", "full_attention"] * 2),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                           out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=16),
        image_token_id=296, video_token_id=297, vision_start_token_id=298,
        vision_end_token_id=299),
    "next": lambda: transformers.Qwen3NextConfig(
        architectures=["Qwen3NextForCausalLM"], tie_word_embeddings=False,
        layer_types=["linear_attention", "linear_attention", "full_attention",
                     "linear_attention"], mlp_only_layers=[1], decoder_sparse_step=1,
        norm_topk_prob=False, partial_rotary_factor=0.25, **TEXT),
}


def _randomize(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("linear_attn.norm.weight"):  # the DeltaNet's plain gated norm
                p.copy_(1 + 0.3 * noise)
            elif "norm" in name:  # zero-centred norms: scale 1 + weight
                p.copy_(0.3 * noise)
            elif name.endswith("A_log"):  # slow decay: the state outlives a chunk
                p.copy_(-3 + 0.5 * noise)
            elif name.endswith("dt_bias"):
                p.copy_(-1 + 0.5 * noise)
            elif name.endswith("mlp.gate.weight"):  # router: peaked, uneven routing
                p.copy_(3 * noise / p.shape[-1] ** 0.5)
            elif "embed" in name or name.endswith(".bias"):
                p.copy_(0.3 * noise)
            else:  # linear [out, in], fused experts [E, out, in], conv1d, patch embedding
                p.copy_(noise / p[0].numel() ** 0.5 if p.dim() > 1 else noise)



def _tokens() -> torch.Tensor:  # below the VL model's special ids
    return torch.randint(0, 290, (2, SEQ), generator=torch.Generator().manual_seed(3))


def _run(rank, world_size, jobs):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from eaft_megatron.checkpoint import find_iteration_dir
    from eaft_megatron.checkpoint.torch_dist import load_model_weights, save_model_checkpoint
    from eaft_megatron.compat import cpu_transformer_config_kwargs, install_cpu_compat
    from eaft_megatron.convert.convert import load_hf_config
    from eaft_megatron.models import build_gpt_model, get_arch, megatron_names

    install_cpu_compat()
    results = []
    for case, ckpt, resaved, padded, reference in jobs:
        hf_config = load_hf_config(Path(ckpt) / "hf")
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
            r = dict(case=case, layout=(tp, ep, pp), rank=rank)
            local = [k for k in model.state_dict() if not k.endswith("_extra_state")]
            r["local_experts"] = sorted({k.split("local_experts.")[1].split(".")[0]
                                         for k in local if "local_experts." in k})
            if (tp, ep, pp) == (1, 1, 1):
                names = megatron_names(get_arch(hf_config), hf_config, te=False)
                r["names_ok"] = sorted(local) == sorted(names)
            load_model_weights([model], find_iteration_dir(ckpt))
            logits = pipeline_logits(model, _tokens())
            if logits is not None:
                err = logits[..., :hf_config.vocab_size] - reference
                r["rel_err"] = (err.abs().max() / reference.abs().max()).item()
            if (tp, ep, pp) == (1, 2, 2):
                save_model_checkpoint([model], Path(resaved), iteration=3)
            results.append(r)
            torch.distributed.barrier()
            ps.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    jobs, sources = [], {}
    for case in sorted(CASES):
        root = tmp_path_factory.mktemp(case)
        config = CASES[case]()
        auto = transformers.AutoModelForCausalLM if case != "vl" else \
            transformers.AutoModelForImageTextToText
        model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
        _randomize(model, 0)
        model.eval()
        model.save_pretrained(root / "hf")
        (root / "hf" / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
        sources[case] = read_saved(root / "hf")
        ckpt = hf_to_megatron(root / "hf", root / "mc", tp=2, progress=False)
        with torch.no_grad():
            out = model(input_ids=_tokens(), output_router_logits=True)
        # The router really routes: every expert gets tokens, each token its own pair.
        for router_logits in [r for r in out.router_logits if r is not None]:
            top = router_logits.topk(2, dim=-1).indices
            assert torch.bincount(top.flatten(), minlength=8).min() > 0, case
            assert len({tuple(sorted(t)) for t in top.tolist()}) > 10, case
        padded = json.loads((ckpt / "eaft_megatron.json").read_text())["padded_vocab_size"]
        jobs.append((case, str(ckpt), str(root / "resaved"), padded, out.logits))
    per_rank = spawn(_run, 4, jobs)
    runs = {}
    for case, ckpt, resaved, _, _ in jobs:
        back = megatron_to_hf(Path(resaved), Path(resaved).parent / "back",
                              hf_config=Path(ckpt) / "hf", progress=False)
        runs[case] = dict(source=sources[case], back=read_saved(back),
                          results=[r for rs in per_rank for r in rs if r["case"] == case])
    return runs


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "tp%d_ep%d_pp%d" % t)
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(runs, case, layout):
    rows = [r for r in runs[case]["results"] if r["layout"] == layout]
    assert len(rows) == 4
    with_logits = [r for r in rows if "rel_err" in r]
    assert len(with_logits) == (4 if layout[2] == 1 else 2)
    for r in with_logits:
        assert r["rel_err"] < 1e-4, (case, layout, r)
    if layout[1] == 2:  # expert parallelism really splits the experts
        assert {tuple(r["local_experts"]) for r in rows} <= {
            ("0", "1", "2", "3"), ("4", "5", "6", "7"), ()}, rows
    if layout == (1, 1, 1):
        assert all(r["names_ok"] for r in rows)


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_through_ep2_pp2_is_bit_exact(runs, case):
    src, back = runs[case]["source"], runs[case]["back"]
    assert sorted(src) == sorted(back)
    assert any(".mlp.experts.7.down_proj" in k for k in src)
    if case == "next":
        assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in src
        assert "model.layers.1.mlp.down_proj.weight" in src  # the dense layer
    assert any(".mlp.shared_expert_gate.weight" in k for k in src)
    for k in src:
        assert src[k].dtype == back[k].dtype and torch.equal(src[k], back[k]), k


def test_grouped_in_proj_matches_transformers_split():
    """Qwen3-Next's key-head-grouped projections, regrouped by the table, give each q, k, v,
    z, b, a head what transformers' own ``fix_query_key_value_ordering`` gives it."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    from eaft_megatron.models.transforms import group_qkvz_ba, ungroup_qkvz_ba

    config = CASES["next"]()
    gdn = Qwen3NextGatedDeltaNet(config, layer_idx=0)
    _randomize(gdn, 1)
    x = torch.randn(2, 5, config.hidden_size, generator=torch.Generator().manual_seed(2))
    sizes = dict(key_heads=2, key_dim=16, value_heads=4, value_dim=24)
    w = ungroup_qkvz_ba(gdn.in_proj_qkvz.weight, gdn.in_proj_ba.weight, **sizes)
    with torch.no_grad():
        hf = gdn.fix_query_key_value_ordering(gdn.in_proj_qkvz(x), gdn.in_proj_ba(x))
        ours = torch.split(x @ w.T, [32, 32, 96, 96, 4, 4], dim=-1)
    for name, h, o in zip("qkvzba", hf, ours):
        # (rounding only: a matmul over another weight shape may sum in another order)
        torch.testing.assert_close(h.reshape(2, 5, -1), o, rtol=1e-6, atol=1e-6, msg=name)
    back = group_qkvz_ba(w, **sizes)
    assert torch.equal(back[0], gdn.in_proj_qkvz.weight) and torch.equal(back[1],
                                                                        gdn.in_proj_ba.weight)
