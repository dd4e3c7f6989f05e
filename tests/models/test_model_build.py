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
    installed = cpu_compat_installed()
    try:
        _build_and_check(hf, capfd, caplog)
    finally:
        if not installed:  # megatron_process_group installs the CPU layer for good
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
