"""Mixture-of-experts models against transformers, on real gloo groups with expert parallelism.

    python -m pytest -q tests/models/test_moe.py

For each tiny random MoE model (Qwen3-MoE, Qwen2-MoE, GLM-4.5; 8 experts, top-2 or top-4,
peaked random router: several experts per token, uneven load; dense and MoE layers mixed; see
``tests/support/tiny_models.py``), saved by transformers, converted once with
``convert hf-to-megatron`` (EP=1), one spawn of 4 ranks loads it from that torch_dist checkpoint
at (TP, EP, PP) = (1, 1, 1), (2, 1, 1), (1, 2, 1) and (1, 2, 2): megatron-core's own MoE layer
(all-to-all token dispatcher, SequentialMLP experts) must give transformers' logits (fp32) at
each layout. The model loaded at EP=2 x PP=2 is saved again (each rank writing its experts) and
converted back to HF: bit-exact with the source, every tensor (GLM-4.5's multi-token-prediction
layer included, carried in ``hf/extra_tensors.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eaft_megatron.convert import hf_to_megatron, megatron_to_hf
from tests.support.launch import spawn

from tests.support.tiny_models import MOE_CASES, build_moe, read_saved, tokens
from tests.support.forward import pipeline_logits

ATOL = 1e-4
LAYOUTS = ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 2, 2))  # (tp, ep, pp)


def _run(rank, world_size, jobs):
    out = []
    for case, ckpt, resaved, reference in jobs:
        out += [dict(r, case=case) for r in _run_case(rank, case, ckpt, resaved, reference)]
    return out


def _run_case(rank, case, ckpt, resaved, reference):
    from pathlib import Path

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from eaft_megatron.checkpoint import (
        find_iteration_dir, load_model_weights, save_model_checkpoint,
    )
    from eaft_megatron.compat import cpu_transformer_config_kwargs, install_cpu_compat
    from eaft_megatron.convert.convert import load_hf_config
    from eaft_megatron.models import build_gpt_model, get_arch, megatron_names

    install_cpu_compat()
    hf_config = load_hf_config(Path(ckpt) / "hf")
    input_ids = tokens(hf_config.vocab_size)
    results = []
    for tp, ep, pp in LAYOUTS:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=ep)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        model = build_gpt_model(
            hf_config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep, padded_vocab=reference["padded"],
            transformer_impl="local", **cpu_transformer_config_kwargs())
        model.eval()
        r = dict(layout=(tp, ep, pp), rank=rank)
        local = [k for k in model.state_dict() if not k.endswith("_extra_state")]
        r["local_experts"] = sorted({k.split("local_experts.")[1].split(".")[0]
                                     for k in local if "local_experts." in k})
        if (tp, ep, pp) == (1, 1, 1):
            names = megatron_names(get_arch(hf_config), hf_config, te=False)
            r["names_ok"] = sorted(local) == sorted(names) and len(set(names)) == len(names)
        load_model_weights([model], find_iteration_dir(ckpt))
        logits = pipeline_logits(model, input_ids)
        if logits is not None:
            err = logits[..., :hf_config.vocab_size] - reference["logits"]
            r["max_err"] = err.abs().max().item()
        if (tp, ep, pp) == (1, 2, 2):
            save_model_checkpoint([model], Path(resaved), iteration=5)
        results.append(r)
        torch.distributed.barrier()
        ps.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    import json

    jobs, sources = [], {}
    for case in sorted(MOE_CASES):
        root = tmp_path_factory.mktemp(case)
        config, model, sources[case] = build_moe(case, root / "hf")
        ckpt = hf_to_megatron(root / "hf", root / "mc", tp=2, progress=False)
        input_ids = tokens(config.vocab_size)
        with torch.no_grad():
            out = model(input_ids, output_router_logits=True)
        # The router really routes: k experts per token, some much busier than others.
        k, experts = config.num_experts_per_tok, len(out.router_logits[0][0])
        for router_logits in out.router_logits:
            load = torch.bincount(router_logits.topk(k, dim=-1).indices.flatten(),
                                  minlength=experts)
            assert load.max() >= 2 * max(load.min(), 1), (case, load)
        padded = json.loads((ckpt / "eaft_megatron.json").read_text())["padded_vocab_size"]
        jobs.append((case, str(ckpt), str(root / "resaved"),
                     dict(logits=out.logits, padded=padded)))
    per_rank = spawn(_run, 4, jobs)
    runs = {}
    for case, ckpt, resaved, _ in jobs:
        resaved = Path(resaved)
        # the resaved checkpoint finds its HF side (config, carried MTP tensors) by --hf-config
        back = megatron_to_hf(resaved, resaved.parent / "back", hf_config=Path(ckpt) / "hf",
                              progress=False)
        runs[case] = dict(case=case, source=sources[case], back=read_saved(back),
                          results=[r for rs in per_rank for r in rs if r["case"] == case])
    return runs


@pytest.fixture(params=sorted(MOE_CASES))
def moe_run(request, moe_runs):
    return moe_runs[request.param]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "tp%d_ep%d_pp%d" % t)
def test_logits_match_transformers(moe_run, layout):
    rows = [r for r in moe_run["results"] if r["layout"] == layout]
    tp, ep, pp = layout
    assert len(rows) == 4
    with_logits = [r for r in rows if "max_err" in r]
    assert len(with_logits) == (4 if pp == 1 else 2)  # the last stage of each pipeline
    for r in with_logits:
        assert r["max_err"] < ATOL, f"{moe_run['case']} {layout} rank {r['rank']}: {r['max_err']}"
    # Expert parallelism really splits the experts: each EP rank holds its half.
    experts = {tuple(r["local_experts"]) for r in rows}
    if ep == 2:
        assert all(len(r["local_experts"]) in (0, 4) for r in rows), rows
        assert experts <= {("0", "1", "2", "3"), ()}, experts
    if layout == (1, 1, 1):
        assert all(r["names_ok"] for r in rows)


def test_round_trip_through_ep2_pp2_is_bit_exact(moe_run):
    src, back = moe_run["source"], moe_run["back"]
    assert sorted(src) == sorted(back)
    assert any(".mlp.experts.7.down_proj" in k for k in src)
    if moe_run["case"] == "glm4_moe":  # the MTP layer (layer num_hidden_layers) came back
        assert "model.layers.4.eh_proj.weight" in back
    for k in src:
        assert src[k].dtype == back[k].dtype and torch.equal(src[k], back[k]), k
