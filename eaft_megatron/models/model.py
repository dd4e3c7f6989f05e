"""Build a Megatron-Core ``GPTModel`` for a HF config; usable as a Megatron model provider.

    from functools import partial
    hf = AutoConfig.from_pretrained(hf_dir)
    provider = partial(build_gpt_model, hf, padded_vocab=padded)   # Megatron-LM's get_model
    model = build_gpt_model(hf, tensor_model_parallel_size=2, params_dtype=torch.bfloat16,
                            bf16=True)   # after parallel_state.initialize_model_parallel(2)
"""

from __future__ import annotations

from typing import Any

from .config import check_config_matches, gpt_model_kwargs, transformer_config_from_hf
from .layers import block_spec
from .registry import get_arch

__all__ = ["build_gpt_model"]


def build_gpt_model(
    hf_config: Any,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    config: Any = None,
    vp_stage: int | None = None,
    pg_collection: Any = None,
    padded_vocab: int | None = None,
    **config_overrides: Any,
):
    """A ``GPTModel`` for this rank's pipeline stage (and virtual stage ``vp_stage``).

    ``config``: a ``TransformerConfig`` to use as is (it must agree with ``hf_config`` on the
    architecture, checked); without it one is made by ``transformer_config_from_hf(hf_config,
    **config_overrides)``. The layer spec follows ``config.transformer_impl`` (local or
    TransformerEngine). ``pre_process`` / ``post_process`` default to whether this rank is the
    first / last pipeline stage in megatron's ``parallel_state``. ``padded_vocab`` defaults to
    ``padded_vocab_size(vocab, tp)``. Megatron-LM's ``get_model`` calls providers with
    ``pre_process``, ``post_process``, ``vp_stage``, ``config`` and ``pg_collection``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    arch = get_arch(hf_config)
    if config is None:
        config = transformer_config_from_hf(hf_config, **config_overrides)
    elif config_overrides:
        raise ValueError(
            f"pass either config or config overrides, not both (got {sorted(config_overrides)})"
        )
    else:
        check_config_matches(hf_config, config)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if config.transformer_impl not in ("local", "transformer_engine"):
        raise ValueError(f"transformer_impl={config.transformer_impl!r} is not supported "
                         "('local' or 'transformer_engine')")
    te = config.transformer_impl == "transformer_engine"
    return GPTModel(
        config,
        block_spec(arch, config, te=te, vp_stage=vp_stage),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
        **gpt_model_kwargs(hf_config, padded_vocab=padded_vocab,
                           tp=config.tensor_model_parallel_size),
    )
