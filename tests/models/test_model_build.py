"""Every model is built through ``models.build_gpt_model``, and megatron-core 0.19's "GPTModel
IS DEPRECATED" notice does not reach users.

    python -m pytest -q tests/models/test_model_build.py
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_building_a_model_prints_no_deprecation_notice(capfd, caplog):
    import transformers

    from eaft_megatron.compat import cpu_compat_installed, uninstall_cpu_compat

    hf = transformers.Qwen3Config(
        architectures=["Qwen3ForCausalLM"], hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        vocab_size=100, max_position_embeddings=32)
    caplog.set_level(logging.DEBUG)
    # megatron's own logger explicitly too: an in-process demo earlier in the session sets
    # "megatron.core" to ERROR for its own output, which this logger would inherit.
    caplog.set_level(logging.DEBUG, logger="megatron.core.models.gpt.gpt_model")
    installed = cpu_compat_installed()
    try:
        _build_and_check(hf, capfd, caplog)
        # megatron_process_group undoes what it set up, the CPU layer included (left installed,
        # it made later in-process tests see a state they did not expect: tests/compat)
        assert cpu_compat_installed() is installed
    finally:
        if not installed:
            uninstall_cpu_compat()


def _build_and_check(hf, capfd, caplog):
    import torch

    from eaft_megatron.checkpoint.torch_dist import megatron_process_group
    from eaft_megatron.compat import cpu_transformer_config_kwargs
    from eaft_megatron.models import build_gpt_model
    from eaft_megatron.models.model import GPT_DEPRECATION_NOTICE

    with megatron_process_group():
        capfd.readouterr()
        model = build_gpt_model(hf, transformer_impl="local", **cpu_transformer_config_kwargs())
        assert type(model).__name__ == "GPTModel"
        out, err = capfd.readouterr()
        assert "DEPRECATED" not in out + err
        assert not [r for r in caplog.records if "DEPRECATED" in r.getMessage()]

        # What is dropped is exactly megatron's notice, and only while build_gpt_model builds:
        # a GPTModel made directly still logs it (so the text still matches megatron's).
        from megatron.core.models.gpt import GPTModel

        caplog.clear()
        GPTModel(model.config, model.transformer_layer_spec, vocab_size=128,
                 max_sequence_length=32, position_embedding_type="rope")
        notices = [r for r in caplog.records if r.getMessage().startswith(GPT_DEPRECATION_NOTICE)]
        assert len(notices) == 1 and notices[0].levelno == logging.WARNING
        assert notices[0].name == "megatron.core.models.gpt.gpt_model"
        assert torch.distributed.get_rank() == 0


def test_only_build_gpt_model_constructs_megatron_models():
    # The package, the tests, benchmarks and examples construct megatron models in one place
    # only (besides the check above, which makes a GPTModel directly to see megatron's notice).
    hits = subprocess.run(
        ["git", "grep", "-n", "-E", r"GPTModel\(|HybridModel\(|MambaModel\(", "--",
         "eaft_megatron/*.py", "tests/*.py", "examples/*.py"],
        cwd=ROOT, capture_output=True, text=True, check=False).stdout.splitlines()
    files = [h.split(":")[0] for h in hits if not h.startswith("tests/models/test_model_build.py")]
    assert files == ["eaft_megatron/models/model.py"], hits


def _tiny_configs():
    import transformers

    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=128, max_position_embeddings=32)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    delta = dict(linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
                 linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"])
    return [
        transformers.Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], mlp_only_layers=[1],
                                    norm_topk_prob=True, **base, **moe),
        transformers.Glm4MoeLiteConfig(
            architectures=["Glm4MoeLiteForCausalLM"],  # head_dim aliases qk_rope_head_dim
            **{k: v for k, v in base.items() if k != "head_dim"},
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, mlp_layer_types=["dense", "sparse"]),
        transformers.Qwen3_5MoeTextConfig(architectures=["Qwen3_5MoeForCausalLM"],
                                          shared_expert_intermediate_size=16, **base, **moe,
                                          **delta),
        transformers.Qwen3NextConfig(architectures=["Qwen3NextForCausalLM"], mlp_only_layers=[0],
                                     shared_expert_intermediate_size=16, **base, **moe, **delta),
    ]


def test_local_checkpoint_norm_names_are_transformer_engines():
    """torch_dist checkpoints written by the local spec (CPU, the converter) name every norm as
    TransformerEngine's spec does (``mapping.megatron_names(te=True)``), MoE, multi-latent and
    DeltaNet layers included, so they load on either path."""
    from eaft_megatron.compat import cpu_compat_installed, uninstall_cpu_compat

    installed = cpu_compat_installed()
    try:
        _check_norm_names()
    finally:
        if not installed:
            uninstall_cpu_compat()


def _check_norm_names():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from eaft_megatron.checkpoint.torch_dist import megatron_process_group
    from eaft_megatron.compat import cpu_transformer_config_kwargs
    from eaft_megatron.models import build_gpt_model, get_arch, megatron_names

    with megatron_process_group():
        for hf in _tiny_configs():
            model = build_gpt_model(hf, padded_vocab=128, transformer_impl="local",
                                    **cpu_transformer_config_kwargs())
            saved = {v.key for v in model.sharded_state_dict().values()
                     if isinstance(v, ShardedTensor) and "norm" in v.key}
            te = {n for n in megatron_names(get_arch(hf), hf, te=True) if "norm" in n}
            assert saved == te, (hf.architectures, sorted(saved ^ te))
