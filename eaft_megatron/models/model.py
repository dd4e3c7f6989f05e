"""Build a Megatron-Core ``GPTModel`` for a HF config; usable as a Megatron model provider.

This is the one place that constructs a megatron model: the converter, the trainer, the demo,
the landscape and the tests all come through :func:`build_gpt_model`. megatron-core 0.19 logs
"GPTModel IS DEPRECATED ..." (a WARNING on rank 0) every time a ``GPTModel`` is constructed,
pointing to its successor ``HybridModel``; that record, and only it, is dropped here (see
docs/models.md, "GPTModel deprecation and HybridModel", for what a switch would take).

    from functools import partial
    hf = AutoConfig.from_pretrained(hf_dir)
    provider = partial(build_gpt_model, hf, padded_vocab=padded)   # Megatron-LM's get_model
    model = build_gpt_model(hf, tensor_model_parallel_size=2, params_dtype=torch.bfloat16,
                            bf16=True)   # after parallel_state.initialize_model_parallel(2)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from .config import check_config_matches, gpt_model_kwargs, transformer_config_from_hf
from .layers import block_spec
from .registry import get_arch

__all__ = ["GPT_DEPRECATION_NOTICE", "build_gpt_model"]

GPT_DEPRECATION_NOTICE = "GPTModel IS DEPRECATED"
"""How megatron-core 0.19's deprecation record for ``GPTModel`` begins."""


def _drop_gpt_deprecation(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(GPT_DEPRECATION_NOTICE)


@contextlib.contextmanager
def _quiet_gpt_deprecation() -> Iterator[None]:
    """Drop megatron's "GPTModel IS DEPRECATED" record while a ``GPTModel`` is constructed
    (a filter on the logger of ``megatron.core.models.gpt.gpt_model``, removed afterwards:
    every other record of that logger, and the same text from anywhere else, still shows)."""
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    logger.addFilter(_drop_gpt_deprecation)
    try:
        yield
    finally:
        logger.removeFilter(_drop_gpt_deprecation)


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
    spec = block_spec(arch, config, te=te, vp_stage=vp_stage)
    kwargs = gpt_model_kwargs(hf_config, padded_vocab=padded_vocab,
                              tp=config.tensor_model_parallel_size)
    with _quiet_gpt_deprecation():
        return GPTModel(config, spec, pre_process=pre_process, post_process=post_process,
                        vp_stage=vp_stage, pg_collection=pg_collection, **kwargs)
