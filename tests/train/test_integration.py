"""``eaft_megatron.megatron`` (installing the loss into models) and the trainer's pure pieces.

    python -m pytest -q tests/train/test_integration.py

One 2-rank spawn (TP=2 GPTModel, real gloo) checks the install on built models; the rest runs
in-process without process groups.
"""

from __future__ import annotations

import argparse
import sys
import types

import pytest
import torch

from tests.support.launch import spawn


def _model_checks(rank: int, world: int) -> dict:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from eaft_megatron import vocab_parallel_eaft_cross_entropy
    from eaft_megatron.compat import cpu_transformer_config_kwargs, install_cpu_compat
    from eaft_megatron.megatron import (EAFTLossConfig, eaft_loss_installed, install_eaft_loss,
                                        uninstall_eaft_loss)
    from eaft_megatron.models import build_gpt_model
    from tests.support.tiny_models import train_config

    install_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    hf = train_config()
    model = build_gpt_model(hf, tensor_model_parallel_size=world, transformer_impl="local",
                            **cpu_transformer_config_kwargs())
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, hf.vocab_size, (2, 12), generator=gen)
    labels = torch.randint(0, hf.vocab_size, (2, 12), generator=gen)
    labels[:, :3] = -100
    positions = torch.arange(12).expand(2, 12)
    out: dict = {}

    def loss_of(m):
        return m(tokens, positions, None, labels=labels.clamp(min=0))

    with torch.no_grad():
        native = loss_of(model)
        out["class_method_untouched"] = "compute_language_model_loss" not in vars(model)
        cfg = EAFTLossConfig(loss_type="sft", stats=False)
        install_eaft_loss(model, cfg)
        installed = vars(model)["compute_language_model_loss"]
        out["sft_equals_megatron"] = (loss_of(model) - native).abs().max().item()
        install_eaft_loss(model, EAFTLossConfig(loss_type="eaft"))  # idempotent: config only
        out["same_callable"] = vars(model)["compute_language_model_loss"] is installed
        out["wrapped_is_class_method"] = installed.__wrapped__.__func__ is \
            type(model).compute_language_model_loss
        eaft = model(tokens, positions, None, labels=labels)
        logits = model(tokens, positions, None)  # [b, s, V/tp]
        expected = vocab_parallel_eaft_cross_entropy(logits.transpose(0, 1), labels.T,
                                                     loss_type="eaft").T
        out["eaft_equals_kernel"] = (eaft - expected).abs().max().item()
        out["eaft_stats_shape"] = tuple(eaft.eaft_stats.weight.shape)
        out["ignored_zero"] = eaft[:, :3].abs().max().item()
        out["installed"] = eaft_loss_installed([model])
        out["uninstalled"] = uninstall_eaft_loss([model]) and not uninstall_eaft_loss(model)
        out["restored"] = (loss_of(model) - native).abs().max().item()
    if True:  # DDP registers grad hooks: not under no_grad
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        install_eaft_loss([ddp], cfg)
        out["through_ddp"] = eaft_loss_installed(model)
        uninstall_eaft_loss(ddp)
        uninstall_eaft_loss(ddp)
        wrapper = torch.nn.Module()  # Float16Module's shape (.module); it needs bf16 weights
        wrapper.module = ddp
        install_eaft_loss(wrapper, cfg)
        out["through_float16"] = eaft_loss_installed(model)
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def model_results():
    return spawn(_model_checks, 2)


def test_install_on_built_models(model_results):
    for r in model_results:
        assert r["class_method_untouched"] and r["same_callable"] and r["wrapped_is_class_method"]
        assert r["sft_equals_megatron"] < 1e-5, r
        assert r["eaft_equals_kernel"] < 1e-6, r
        assert r["eaft_stats_shape"] == (2, 12)
        assert r["ignored_zero"] == 0
        assert r["installed"] and r["uninstalled"] and r["restored"] == 0
        assert r["through_ddp"] and r["through_float16"]


def test_reduce_matches_megatron_per_token_contract():
    from eaft_megatron.ops import EAFTTokenStats
    from eaft_megatron.megatron import EAFTLossConfig, reduce_eaft_loss

    ce = torch.tensor([[2.0, 1.0, 3.0], [0.5, 4.0, 1.0]])
    weight = torch.tensor([[0.5, 1.0, 0.1], [1.0, 0.2, 0.05]])
    entropy = weight * torch.log(torch.tensor(20.0))
    prob = torch.tensor([[0.1, 0.5, 0.01], [0.9, 0.01, 0.2]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss = weight * ce
    loss.eaft_stats = EAFTTokenStats(ce, prob, entropy, weight, mask.bool())
    total, n, report = reduce_eaft_loss(mask, loss, EAFTLossConfig(conflict_entropy=0.3,
                                                                   conflict_prob=0.1))
    assert int(n) == 5
    assert total.item() == pytest.approx((loss * mask).sum().item())
    assert report["lm loss"].tolist() == pytest.approx([(ce * mask).sum().item(), 5])
    assert report["eaft loss"].tolist() == pytest.approx([total.item(), 5])
    assert report["gate weight"].tolist() == pytest.approx([(weight * mask).sum().item(), 5])
    # conflicts: weight < 0.3 and p < 0.1 among masked tokens -> (1,1) only ((0,2) is masked)
    assert report["confident conflicts"].tolist() == pytest.approx([1.0, 5])
    plain = torch.tensor([[1.0, 2.0]])  # Megatron's own loss: no stats, only 'lm loss'
    total, n, report = reduce_eaft_loss(torch.ones(1, 2), plain)
    assert set(report) == {"lm loss"} and report["lm loss"].tolist() == [3.0, 2.0]


def test_add_eaft_args_and_config():
    from eaft_megatron.megatron import EAFTLossConfig, add_eaft_args

    parser = add_eaft_args(argparse.ArgumentParser())
    args = parser.parse_args(["--loss-type", "dft", "--eaft-top-k", "10", "--eaft-alpha", "0.5",
                              "--eaft-entropy", "full"])
    cfg = EAFTLossConfig.from_args(args)
    assert (cfg.loss_type, cfg.top_k, cfg.alpha, cfg.entropy, cfg.stats) == \
        ("dft", 10, 0.5, "full", True)
    assert EAFTLossConfig.from_args(parser.parse_args([])).loss_type == "eaft"
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss-type", "focal"])
    with pytest.raises(ValueError, match="top_k"):
        EAFTLossConfig(top_k=1)
    with pytest.raises(ValueError, match="conflict_prob"):
        EAFTLossConfig(conflict_prob=2.0)


def test_missing_megatron_symbol_is_named(monkeypatch):
    from eaft_megatron.megatron import install_eaft_loss

    monkeypatch.setitem(sys.modules,
                        "megatron.core.models.common.language_module.language_module", None)
    with pytest.raises(ImportError, match="LanguageModule"):
        install_eaft_loss(torch.nn.Linear(2, 2))


def test_non_language_module_is_refused():
    from eaft_megatron.megatron import install_eaft_loss

    with pytest.raises(TypeError, match="LanguageModule"):
        install_eaft_loss(torch.nn.Linear(2, 2))


def test_nonfinite_loss_stops_naming_the_iteration(monkeypatch):
    import megatron.training

    from eaft_megatron.megatron import EAFTLossConfig
    from eaft_megatron.train.steps import loss_func

    args = types.SimpleNamespace(check_for_nan_in_loss_and_grad=True, curr_iteration=6,
                                 iteration=0)
    monkeypatch.setattr(megatron.training, "get_args", lambda: args)
    mask = torch.ones(1, 3)
    ok = loss_func(mask, EAFTLossConfig(), "train", torch.tensor([[1.0, 2.0, 3.0]]))
    assert ok[0].item() == 6.0
    with pytest.raises(FloatingPointError, match="iteration 7"):
        loss_func(mask, EAFTLossConfig(), "train", torch.tensor([[1.0, float("nan"), 3.0]]))
    args.check_for_nan_in_loss_and_grad = False  # the guard does not depend on Megatron's check
    with pytest.raises(FloatingPointError, match=r"non-finite eaft loss \(inf\)"):
        loss_func(mask, EAFTLossConfig(), "train", torch.tensor([[1.0, float("inf"), 3.0]]))


def test_complete_argv(tmp_path, monkeypatch):
    import eaft_megatron.train.argv as argv_module
    from eaft_megatron.train.argv import TrainArgError, complete_argv, flag_value

    # a hand-made checkpoint layout; its files are validated in tests/train/test_restart.py
    monkeypatch.setattr(argv_module, "check_checkpoint_files", lambda root, iteration, **kw: None)
    from tests.support.tiny_models import train_config

    train_config().save_pretrained(tmp_path / "ckpt" / "hf")
    (tmp_path / "ckpt" / "eaft_megatron.json").write_text("{}")
    (tmp_path / "ckpt" / "iter_0000000").mkdir()
    (tmp_path / "ckpt" / "iter_0000000" / ".metadata").write_bytes(b"")
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("0")
    argv, info = complete_argv(["--load", str(tmp_path / "ckpt"), "--eval-only"], cpu=True,
                               te_available=False)
    assert flag_value(argv, "--num-layers") == "2" and flag_value(argv, "--kv-channels") == "16"
    assert flag_value(argv, "--vocab-size") == "300"
    assert flag_value(argv, "--distributed-backend") == "gloo"
    for flag in ("--skip-train", "--finetune", "--calculate-per-token-loss", "--qk-layernorm",
                 "--untie-embeddings-and-output-weights", "--swiglu", "--group-query-attention"):
        assert flag in argv, flag
    assert "--eval-only" not in argv and flag_value(argv, "--train-iters") == "0"
    argv, _ = complete_argv(["--hf-config", str(tmp_path / "ckpt" / "hf"), "--num-layers", "2",
                             "--distributed-backend", "nccl"], cpu=True, te_available=False)
    assert argv.count("--num-layers") == 1 and flag_value(argv, "--distributed-backend") == "nccl"
    argv, _ = complete_argv(["--hf-config", str(tmp_path / "ckpt" / "hf")], cpu=False,
                            te_available=False)
    assert flag_value(argv, "--transformer-impl") == "local" and "--use-cpu-initialization" \
        not in argv
    for flag in ("--no-rope-fusion", "--no-gradient-accumulation-fusion",  # GPU without TE/apex
                 "--no-masked-softmax-fusion"):
        assert flag in argv, flag
    with pytest.raises(TrainArgError, match="--hidden-size 128 disagrees"):
        complete_argv(["--hf-config", str(tmp_path / "ckpt" / "hf"), "--hidden-size", "128"],
                      cpu=True, te_available=False)
    with pytest.raises(TrainArgError, match=f"--load {tmp_path}: no checkpoint there"):
        complete_argv(["--load", str(tmp_path)], cpu=True, te_available=False)
    with pytest.raises(TrainArgError, match="--hf-config"):
        complete_argv(["--train-iters", "1"], cpu=True, te_available=False)
