"""The pieces Megatron-LM's ``pretrain`` asks for: model provider, forward step (with the EAFT
loss function) and datasets provider, over HF-described models and prepared SFT data.

Batches: every rank reads its data-parallel share itself (``is_distributed``: the datasets are
memory-mapped and cheap), so tensor-parallel peers need no broadcast and every pipeline stage
has the attention layout it needs. Attention over packed conversations:

- ``--transformer-impl local`` (CPU): the dense block-diagonal causal mask ``[b, 1, S, S]``.
- ``--transformer-impl transformer_engine`` (GPU): THD packing, the batch flattened to
  ``[1, b*S]`` with ``PackedSeqParams`` built from the samples' ``cu_seqlens``; no dense mask.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..compat.cpu import run_device
from ..megatron import EAFTLossConfig, install_eaft_loss, reduce_eaft_loss
from .guard import check_loss
from .metrics import expert_load

__all__ = ["datasets_provider", "forward_step", "loss_func", "model_provider"]

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask", "cu_seqlens",
              "max_seqlen", "first_conversation", "sample_index")


def _uses_te(args: Any) -> bool:
    return getattr(args, "transformer_impl", "local") == "transformer_engine"


def model_provider(hf_config: Any, pre_process: bool = True, post_process: bool = True,
                   vp_stage: int | None = None, config: Any = None, pg_collection: Any = None,
                   *, hf_weights: str | None = None):
    """A ``GPTModel`` chunk for ``hf_config`` with Megatron-LM's config, EAFT loss installed
    (and, for MoE models, the routers' token counts feeding ``metrics.jsonl``); with
    ``hf_weights`` (a Hugging Face model directory) its parameters are filled from there
    (:func:`.hf_load.fill_from_hf`) before Megatron wraps the chunk and builds the optimizer."""
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    from ..models import build_gpt_model

    args = get_args()
    if config is None:
        config = core_transformer_config_from_args(args)
    if hf_weights is not None:
        # fill_from_hf overwrites every parameter and buffer of the state dict (it refuses a
        # chunk where it would not): megatron's random initialisation would only cost time
        # and, on the CPU, full-size temporaries (each TP-split weight is drawn whole).
        import copy

        config = copy.copy(config)  # (megatron passes one config to every chunk)
        config.perform_initialization = False
    model = build_gpt_model(hf_config, pre_process=pre_process, post_process=post_process,
                            config=config, vp_stage=vp_stage, pg_collection=pg_collection,
                            padded_vocab=args.padded_vocab_size)
    if hf_weights is not None:
        from .hf_load import fill_from_hf

        fill_from_hf(model, hf_config, hf_weights, padded_vocab=args.padded_vocab_size)
    expert_load.attach(model)  # MoE: tokens per expert for metrics.jsonl
    return install_eaft_loss(model, loss_config(args, hf_config))


def loss_config(args: Any, hf_config: Any) -> EAFTLossConfig:
    """The EAFT options, with the softmax restricted to the HF model's real vocabulary."""
    return EAFTLossConfig.from_args(args, vocab_size=hf_config.vocab_size)


def get_batch(data_iterator: Any, args: Any) -> dict[str, Any]:
    """The next micro-batch on this rank's device, laid out for the attention backend."""
    batch = next(data_iterator)
    device = run_device()
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in BATCH_KEYS}
    batch["packed_seq_params"] = None
    if _uses_te(args):
        from ..data import packed_seq_params

        batch["packed_seq_params"] = packed_seq_params(batch)
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            batch[key] = batch[key].reshape(1, -1)  # [b, S] -> [1, b*S] (THD)
        batch["attention_mask"] = None
    return batch


def loss_func(loss_mask: torch.Tensor, config: EAFTLossConfig, where: str,
              output_tensor: torch.Tensor, landscape: Any = None):
    """Megatron's per-token loss contract; a non-finite loss stops the run (:mod:`.guard`),
    whether or not ``--check-for-nan-in-loss-and-grad`` is on. ``landscape``: the
    :mod:`.landscape` collector of this micro-batch (evaluations that write one)."""
    loss_sum, num_tokens, report = reduce_eaft_loss(loss_mask, output_tensor, config)
    check_loss(loss_sum, where=where, loss_type=config.loss_type)
    if landscape is not None:
        landscape(output_tensor)
    return loss_sum, num_tokens, report


def forward_step(data_iterator: Any, model: Any, return_schedule_plan: bool = False):
    """One micro-batch forward; returns ``(per-token loss [b, s], loss function)``."""
    from megatron.training import get_args, get_timers

    if return_schedule_plan:
        raise NotImplementedError("--overlap-moe-expert-parallel-comm is not supported")
    args = get_args()
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator, args)
    timers("batch-generator").stop()
    fused = {}
    if getattr(args, "eaft_fused_linear", False):  # output layer + loss in one op
        from ..megatron import eaft_output_processor, language_modules

        installed = language_modules(model)[0].compute_language_model_loss
        fused = dict(output_processor=eaft_output_processor,
                     output_processor_context=installed.config)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"], loss_mask=batch["loss_mask"],
                   packed_seq_params=batch["packed_seq_params"], **fused)
    config = EAFTLossConfig.from_args(args)  # thresholds for the report; vocab not needed
    where = "train" if model.training else "evaluation"
    from .landscape import active

    landscape = active()
    hook = landscape.hook(batch) if landscape is not None and not model.training else None
    return output, partial(loss_func, batch["loss_mask"], config, where, landscape=hook)


def datasets_provider(train_valid_test_num_samples: list[int], vp_stage: int | None = None):
    """(train, validation, None) ``SFTIndexedDataset``s over ``--data-path``.

    Train (``--data-path`` or ``--train-data-path``): shuffled per epoch with ``--seed``,
    ``num_samples`` = Megatron's train samples (more than one epoch when needed); Megatron's
    sampler resumes it at ``consumed_train_samples``. Validation: ``--valid-data-path``
    (default: the training data) in stored order, cycled.
    """
    from megatron.training import get_args, print_rank_0

    from ..data import SFTIndexedDataset

    args = get_args()
    train_n, valid_n, _ = train_valid_test_num_samples
    mask = not _uses_te(args)
    kwargs = dict(seq_length=args.seq_length, attention_mask=mask)
    paths = args.train_data_path or args.data_path or []
    if len(paths) != 1:
        raise ValueError(f"--data-path must be one prepared prefix (eaft-megatron preprocess "
                         f"--output-prefix), got {paths}")
    train = None
    if train_n and not args.skip_train:
        train = SFTIndexedDataset(paths[0], seed=args.seed, num_samples=train_n, **kwargs)
    valid = None
    if valid_n is None or valid_n > 0:
        valid_path = (args.valid_data_path or paths)[0]
        valid = SFTIndexedDataset(valid_path, shuffle=False, num_samples=valid_n, **kwargs)
    print_rank_0(f"> SFT data: train {paths[0]} ({train_n} samples), "
                 f"validation {valid.path_prefix if valid else None} ({valid_n} samples)")
    return train, valid, None


datasets_provider.is_distributed = True  # every rank builds its own (see the module doc)
