"""``python -m eaft_megatron.train`` on mixture-of-experts models: Megatron's real loop, torchrun,
gloo, CPU, fp32, megatron-core's MoE layer with the all-to-all dispatcher.

    python -m pytest -q tests/train/test_moe_train.py

Inputs: the tiny random Qwen3-MoE and GLM-4.5 of ``tests/support/tiny_models.py`` (4 layers,
hidden 64, 8 experts, peaked routers: uneven load) saved by transformers and converted with
``convert hf-to-megatron`` (EP=1), and the 24 tokenized conversations of
``tests/support/fixtures.py``.
Launches (7 in all): Qwen3-MoE 6 iterations at EP=1 (save + evaluation every 3), 3 iterations
at EP=2 on 2 ranks (save + evaluation at 3, ``--exit-interval``), its resume to iteration 6,
an evaluation-only run of it at EP=1; GLM-4.5 one iteration at EP=2 (save) and a resume of it
for a second one. Resuming *training* at another EP than the checkpoint's, and training at
TP > 1 without sequence parallelism, fail inside megatron-core 0.19: the trainer refuses them
in one line (tested without a launch).

"Same losses" at EP=1 and EP=2: micro-batch 1 and global batch 4 in both layouts (EP=1: one
rank, 4 micro-batches; EP=2: data-parallel 2 for the dense parts, expert-data-parallel 1, 2
micro-batches per rank), so every micro-batch is the same single sample. Megatron's loss (sum
of w*CE over the global batch / its supervised tokens), the plain CE, the gate statistics, the
gradient norm (which includes the aux loss gradient: megatron-core adds
``coeff * load_balancing_loss`` to the backward only) and ``load_balancing_loss`` (computed per
micro-batch and MoE layer, averaged; it depends on how the tokens are cut into micro-batches,
which is the same here) agree at rel 1e-5 for 3 iterations, and the expert load figures exactly.
Proofs against transformers (independent oracle: the HF model run on each sample's segments,
its routers' own logits and choices):

  * ``load_balancing_loss`` of iteration 1 == E * sum_i f_i P_i per sample and MoE layer,
    averaged; ``expert_load_imbalance`` == max/mean of the HF routers' token counts;
  * the trainer checkpoint saved at EP=2 converts back to HF (``megatron-to-hf``) and
    transformers' CE / gate weight / entropy / confident-conflict share over the 24 samples ==
    the trainer's evaluation of it;
  * resume of the EP=2 checkpoint == the straight EP=1 run (losses, grad norm, learning rate,
    data position, evaluation); its evaluation at EP=1 == the EP=2 evaluation: the torch_dist
    checkpoint loads at another EP;
  * GLM-4.5 (sigmoid router + ``e_score_correction_bias`` = megatron's ``expert_bias``): after
    iteration 1 every bias moved by ``1e-3 * sign(mean load - load)`` (megatron's default
    ``--moe-router-bias-update-rate``; loads counted by transformers' router on the source
    model), the exported HF model carries it as ``e_score_correction_bias``, and the resumed
    run's second update starts from it (loads from the exported iteration-1 model).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.launch import ROOT, check, run_train, subprocess_env, run_module

REL = 1e-5
RATE = 1e-3  # megatron-core's default --moe-router-bias-update-rate (the trainer keeps it)
COMMON = ("--data-path", None, "--lr", "1e-3", "--min-lr", "1e-3", "--lr-decay-style",
          "constant", "--log-interval", "1", "--seed", "1234", "--loss-type", "eaft",
          "--eaft-conflict-entropy", "0.9", "--eaft-conflict-prob", "0.05")
QWEN = ("--micro-batch-size", "1", "--global-batch-size", "4")
EVAL_ALL = ("--eval-iters", "6")  # 6 x 4 = the 24 stored samples, in stored order
NO_EVAL = ("--eval-interval", "1000", "--eval-iters", "0")
GLM = ("--micro-batch-size", "4", "--global-batch-size", "24")  # one iteration = every sample
COMPARED = ("loss", "lm_loss", "gate_weight", "entropy", "confident_conflicts", "grad_norm",
            "load_balancing_loss", "expert_load_imbalance", "expert_load_imbalance_max")


def build(root: Path) -> None:
    """The two tiny MoE models, saved by transformers and converted, and the data."""
    from eaft_megatron.convert import hf_to_megatron
    from tests.support.fixtures import write_data
    from tests.support.tiny_models import build_moe

    for case in ("qwen3_moe", "glm4_moe"):
        build_moe(case, root / f"{case}_hf")
        hf_to_megatron(root / f"{case}_hf", root / f"{case}_mcore", tp=1, pp=1, dtype="fp32",
                       progress=False)
    write_data(root / "data" / "train")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_train")
    subprocess.run([sys.executable, "-m", "tests.train.test_moe_train", str(root)], cwd=ROOT,
                   env=subprocess_env(), check=True, capture_output=True, timeout=300)
    return dict(root=root, data=root / "data" / "train")


def _common(tiny) -> list[str]:
    return [str(tiny["data"]) if a is None else a for a in COMMON]


def _export(tiny, run: str) -> Path:
    out = tiny["root"] / f"{run}_hf_export"
    if not out.exists():
        run_module("eaft_megatron", "convert", "megatron-to-hf", "--megatron",
                   tiny["root"] / run, "--out", out, "--dtype", "fp32", check=True)
    return out


@pytest.fixture(scope="module")
def straight(tiny):
    """Qwen3-MoE, EP=1, 6 iterations from the converted model, save + evaluation every 3."""
    out = tiny["root"] / "straight"
    return check(run_train(out, "--load", str(tiny["root"] / "qwen3_moe_mcore"), "--save",
                           str(out), "--save-interval", "3", "--train-iters", "6",
                           "--eval-interval", "3", *EVAL_ALL, *QWEN, *_common(tiny)))


@pytest.fixture(scope="module")
def ep2(tiny):
    """Qwen3-MoE, EP=2 on 2 ranks, the 6-iteration schedule stopped after 3 (save +
    evaluation at 3)."""
    out = tiny["root"] / "ep2"
    return check(run_train(out, "--load", str(tiny["root"] / "qwen3_moe_mcore"), "--save",
                           str(out), "--save-interval", "3", "--train-iters", "6",
                           "--exit-interval", "3",
                           "--eval-interval", "3", *EVAL_ALL, "--expert-model-parallel-size",
                           "2", *QWEN, *_common(tiny), nproc=2))


@pytest.fixture(scope="module")
def glm(tiny):
    """GLM-4.5, EP=2 on 2 ranks: a 2-iteration schedule stopped after iteration 1 (all 24
    samples; save), then resumed from that checkpoint for iteration 2 (save)."""
    first, second = tiny["root"] / "glm1", tiny["root"] / "glm2"
    one = check(run_train(first, "--load", str(tiny["root"] / "glm4_moe_mcore"), "--save",
                          str(first), "--save-interval", "1", "--train-iters", "2",
                          "--exit-interval", "1", *NO_EVAL,
                          "--expert-model-parallel-size", "2", *GLM, *_common(tiny), nproc=2))
    two = check(run_train(second, "--load", str(first), "--save", str(second),
                          "--save-interval", "1", "--train-iters", "2", *NO_EVAL,
                          "--expert-model-parallel-size", "2", *GLM, *_common(tiny), nproc=2))
    return one, two


# ---------------------------------------------------------------- transformers oracles

def _router_choices(model_dir: Path, data_prefix: Path, indices) -> dict[int, list]:
    """``{layer: [(router logits [S, E] fp64, chosen experts [S, k]) per sample]}`` of the HF
    model's MoE layers, each sample run as Megatron sees it: one sequence per segment of its
    ``cu_seqlens`` (conversations, then the padding), positions restarting at 0."""
    import transformers

    from eaft_megatron.data import SFTIndexedDataset

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    gates = {int(name.split(".")[2]): module for name, module in model.named_modules()
             if name.endswith("mlp.gate")}
    seen: dict[int, list] = {}
    hooks = [module.register_forward_hook(
        lambda mod, args, out, layer=layer: seen.setdefault(layer, []).append(out))
        for layer, module in gates.items()]
    result: dict[int, list] = {layer: [] for layer in gates}
    dataset = SFTIndexedDataset(str(data_prefix), seed=1234)  # the trainer's epoch order
    try:
        for index in indices:
            sample = dataset[index]
            bounds = sample["cu_seqlens"].tolist()
            seen.clear()
            for a, b in zip(bounds[:-1], bounds[1:]):
                if b > a:
                    with torch.no_grad():
                        model(sample["tokens"][a:b][None],
                              position_ids=sample["position_ids"][a:b][None])
            for layer in gates:  # router output: (logits, top-k weights, top-k indices)
                result[layer].append((torch.cat([o[0] for o in seen[layer]]).double(),
                                      torch.cat([o[2] for o in seen[layer]])))
    finally:
        for hook in hooks:
            hook.remove()
    return result


def _loads(choices: dict[int, list], experts: int) -> dict[int, torch.Tensor]:
    """Tokens per expert of each MoE layer, over all the samples."""
    return {layer: torch.bincount(torch.cat([c for _, c in per]).reshape(-1),
                                  minlength=experts).double()
            for layer, per in choices.items()}


def _imbalance(loads: dict[int, torch.Tensor]) -> tuple[float, float]:
    ratios = [float(x.max() / x.mean()) for x in loads.values()]
    return sum(ratios) / len(ratios), max(ratios)


def _switch_aux_loss(choices: dict[int, list], experts: int, topk: int) -> float:
    """E * sum_i f_i P_i per micro-batch (one sample) and MoE layer, averaged over both:
    f_i = tokens routed to expert i / (tokens * topk), P_i = mean softmax probability."""
    values = []
    for per in choices.values():
        for logits, chosen in per:
            f = torch.bincount(chosen.reshape(-1), minlength=experts).double() / chosen.numel()
            p = torch.softmax(logits, dim=-1).mean(dim=0)
            values.append(experts * float((f * p).sum()))
    return sum(values) / len(values)


def _checkpoint_tensors(iteration_dir: Path, contains: str) -> dict[str, torch.Tensor]:
    """Tensors of a torch_dist checkpoint whose name contains ``contains`` (no process group)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(iteration_dir))
    metadata = reader.read_metadata().state_dict_metadata
    tensors = {k: torch.empty(v.size) for k, v in metadata.items()
               if contains in k and hasattr(v, "size")}
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors


def _hf_bias(model_dir: Path) -> dict[int, torch.Tensor]:
    from tests.support.tiny_models import read_saved

    return {int(k.split(".")[2]): v for k, v in read_saved(Path(model_dir)).items()
            if k.endswith("mlp.gate.e_score_correction_bias") and int(k.split(".")[2]) < 4}


# ---------------------------------------------------------------- Qwen3-MoE: layouts, resume

def test_moe_records(straight):
    first = straight.train()[1]
    assert first["load_balancing_loss"] > 1  # uneven routing (1.0 = perfectly balanced)
    assert 1 < first["expert_load_imbalance"] <= first["expert_load_imbalance_max"] <= 8 / 2
    for record in straight.of("valid"):  # evaluations carry no router figures
        assert "load_balancing_loss" not in record and "expert_load_imbalance" not in record


def test_ep2_gives_the_same_losses(straight, ep2):
    reference, got = straight.train(), ep2.train()
    assert sorted(got) == [1, 2, 3]
    for it in (1, 2, 3):
        for key in COMPARED:
            assert got[it][key] == pytest.approx(reference[it][key], rel=REL), (it, key)
    valid = ep2.of("valid")[0]
    assert valid["iteration"] == 3
    for key in ("loss", "lm_loss", "gate_weight", "entropy", "confident_conflicts"):
        assert valid[key] == pytest.approx(straight.of("valid")[0][key], rel=REL), key


def test_router_figures_match_transformers(tiny, straight):
    """Iteration 1 routes the first global batch (samples 0-3 of the epoch order) with the
    source weights: transformers' routers give the same aux loss and expert loads."""
    choices = _router_choices(tiny["root"] / "qwen3_moe_hf", tiny["data"], range(4))
    assert sorted(choices) == [0, 2, 3]  # layer 1 is dense (mlp_only_layers)
    first = straight.train()[1]
    assert first["load_balancing_loss"] == pytest.approx(_switch_aux_loss(choices, 8, 2),
                                                         rel=REL)
    mean, worst = _imbalance(_loads(choices, 8))
    assert first["expert_load_imbalance"] == pytest.approx(mean, rel=1e-9)
    assert first["expert_load_imbalance_max"] == pytest.approx(worst, rel=1e-9)


def test_ep2_checkpoint_resumes_exactly(tiny, straight, ep2):
    """Resumed at EP=2 from its iteration-3 checkpoint == the straight EP=1 run."""
    out = tiny["root"] / "resumed"
    run = check(run_train(out, "--load", str(tiny["root"] / "ep2"), "--save", str(out),
                          "--save-interval", "3", "--train-iters", "6", "--eval-interval", "3",
                          *EVAL_ALL, "--expert-model-parallel-size", "2", *QWEN, *_common(tiny),
                          nproc=2))
    assert run.records[0]["kind"] == "restart" and run.records[0]["iteration"] == 3
    reference, got = straight.train(), run.train()
    assert sorted(got) == [4, 5, 6]
    for it in (4, 5, 6):
        assert got[it]["consumed_samples"] == reference[it]["consumed_samples"]
        for key in (*COMPARED, "learning_rate"):
            assert got[it][key] == pytest.approx(reference[it][key], rel=REL), (it, key)
    assert run.of("valid")[0]["lm_loss"] == pytest.approx(straight.of("valid")[1]["lm_loss"],
                                                          rel=REL)


def test_ep2_checkpoint_evaluates_at_ep1(tiny, ep2):
    """The torch_dist checkpoint written by 2 expert-parallel ranks, evaluated by one."""
    out = tiny["root"] / "eval_ep1"
    run = check(run_train(out, "--load", str(tiny["root"] / "ep2"), "--eval-only", *EVAL_ALL,
                          *QWEN, *_common(tiny)))
    got, reference = run.of("valid")[0], ep2.of("valid")[-1]
    assert got["iteration"] == 3
    for key in ("loss", "lm_loss", "gate_weight", "entropy", "confident_conflicts"):
        assert got[key] == pytest.approx(reference[key], rel=REL), key


def test_moe_layouts_megatron_cannot_train_are_refused(tiny, ep2):
    """One line before starting, for what fails deep inside megatron-core 0.19: resuming at
    another EP (the EP=2 optimizer chain, dense + expert optimizers, does not load into the
    EP=1 one: a ValueError on the param groups; EP=1 -> 2: "Expected 2 entries in state
    dict"; weights-only loads, evaluation and --finetune, are allowed) and training at TP > 1
    without --sequence-parallel (the MoE layer's ValueError at the first forward; on CPU the
    local norms refuse sequence parallelism)."""
    from eaft_megatron.train.argv import TrainArgError, complete_argv

    common = [*QWEN, *_common(tiny), "--train-iters", "6"]
    load = ["--load", str(tiny["root"] / "ep2")]
    with pytest.raises(TrainArgError, match="saved at expert-parallel size 2"):
        complete_argv([*load, "--save", str(tiny["root"] / "ep1_resume"), *common], cpu=True,
                      te_available=False)
    for allowed in (["--eval-only"], ["--save", str(tiny["root"] / "ep1_new"), "--finetune"],
                    ["--save", str(tiny["root"] / "ep2_more"), "--expert-model-parallel-size",
                     "2"]):
        complete_argv([*load, *allowed, *common], cpu=True, te_available=False)
    # megatron-core's MoE layer trains at TP > 1 only with sequence parallelism (not on CPU)
    fresh = ["--load", str(tiny["root"] / "qwen3_moe_mcore"), "--tensor-model-parallel-size", "2"]
    with pytest.raises(TrainArgError, match="--sequence-parallel, which its CPU"):
        complete_argv([*fresh, *common], cpu=True, te_available=False)
    with pytest.raises(TrainArgError, match="only with --sequence-parallel; add it"):
        complete_argv([*fresh, *common], cpu=False, te_available=True)
    complete_argv([*fresh, "--sequence-parallel", *common], cpu=False, te_available=True)
    complete_argv([*fresh, "--eval-only", *common], cpu=True, te_available=False)


def test_ep2_checkpoint_converts_back_to_hf(tiny, straight, ep2):
    from .test_pretrain import _hf_reference

    ref = _hf_reference(_export(tiny, "ep2"), tiny["data"])
    valid = ep2.of("valid")[-1]
    assert valid["iteration"] == 3
    assert valid["lm_loss"] == pytest.approx(ref["ce"], rel=REL)
    assert valid["gate_weight"] == pytest.approx(ref["weight"], rel=REL)
    assert valid["entropy"] == pytest.approx(ref["entropy"], rel=REL)
    assert valid["confident_conflicts"] == pytest.approx(ref["conflicts"], abs=1e-6)
    # EAFT training lowered the loss: before (transformers on the source) > 3 > 6 iterations
    before = _hf_reference(tiny["root"] / "qwen3_moe_hf", tiny["data"])
    valid3, valid6 = (r["lm_loss"] for r in straight.of("valid")[:2])
    assert valid6 < valid3 < before["ce"]
    for r in straight.of("train") + straight.of("valid"):
        assert 0 <= r["gate_weight"] <= 1 and 0 <= r["confident_conflicts"] <= 1
        assert 0 <= r["entropy"] <= math.log(20) + 1e-6 and r["loss"] <= r["lm_loss"] + 1e-6


# ---------------------------------------------------------------- GLM-4.5: the expert bias

def test_glm_expert_bias_update_checkpoint_resume_export(tiny, glm):
    one, two = glm
    record = one.train()[1]
    assert "load_balancing_loss" not in record  # aux-loss free (router_aux_loss_coef absent)
    source = _hf_bias(tiny["root"] / "glm4_moe_hf")
    assert sorted(source) == [1, 2, 3]  # layer 0 dense (first_k_dense_replace)
    # iteration 1: loads of the source model over the 24 samples (the whole global batch)
    loads = _loads(_router_choices(tiny["root"] / "glm4_moe_hf", tiny["data"], range(24)), 8)
    mean, worst = _imbalance(loads)
    assert record["expert_load_imbalance"] == pytest.approx(mean, rel=1e-9)
    assert record["expert_load_imbalance_max"] == pytest.approx(worst, rel=1e-9)
    exported = _export(tiny, "glm1")
    bias1 = _hf_bias(exported)
    saved1 = _checkpoint_tensors(tiny["root"] / "glm1" / "iter_0000001", "expert_bias")
    for layer, load in loads.items():
        expected = source[layer].double() + RATE * torch.sign(load.mean() - load)
        assert torch.allclose(bias1[layer].double(), expected, rtol=0, atol=1e-7), layer
        assert (bias1[layer] < source[layer]).any() and (bias1[layer] > source[layer]).any()
        # the overloaded experts got a lower bias
        assert torch.equal(bias1[layer] < source[layer], load > load.mean())
        assert torch.equal(saved1[f"decoder.layers.{layer}.mlp.router.expert_bias"],
                           bias1[layer])  # the export carries the checkpoint's bias as is
    # iteration 2, resumed from the iteration-1 checkpoint: starts from bias1
    assert two.records[0]["kind"] == "restart" and sorted(two.train()) == [2]
    loads = _loads(_router_choices(exported, tiny["data"], range(24)), 8)
    saved2 = _checkpoint_tensors(tiny["root"] / "glm2" / "iter_0000002", "expert_bias")
    for layer, load in loads.items():
        expected = bias1[layer].double() + RATE * torch.sign(load.mean() - load)
        saved = saved2[f"decoder.layers.{layer}.mlp.router.expert_bias"].double()
        assert torch.allclose(saved, expected, rtol=0, atol=1e-7), layer


if __name__ == "__main__":
    build(Path(sys.argv[1]))
