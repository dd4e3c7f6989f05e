"""Install the EAFT loss into built Megatron-Core language models, and reduce it as Megatron does.

    from eaft_megatron.megatron import EAFTLossConfig, install_eaft_loss, reduce_eaft_loss

    model = install_eaft_loss(model, EAFTLossConfig(loss_type="eaft"))   # chunk, list, wrapped
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)  # [b, s] w*CE
    loss_sum, num_tokens, report = reduce_eaft_loss(loss_mask, output_tensor)  # Megatron's
                                                         # per-token loss contract
    uninstall_eaft_loss(model)                                         # back to Megatron's CE

Why per instance: ``GPTModel._postprocess`` calls ``self.compute_language_model_loss(labels,
logits)``, and ``language_module.py`` binds Megatron's CE functions at import time, so patching
them by name does nothing. An instance attribute shadows the class method for that model only:
every pipeline stage and virtual chunk that has an output layer gets it (stages without one never
call it, installing there is harmless), nothing global changes, and ``uninstall_eaft_loss``
deletes the attribute. The installed callable keeps the original bound method as
``__wrapped__`` and the config as ``.config``; installing again only replaces the config.

The installed loss returns ``w_t * CE_t`` ``[b, s]`` float32 (what Megatron's own loss returns
shape-wise, so any Megatron loss function works with it) and attaches the per-token statistics
of the same pass as ``output.eaft_stats`` (:class:`EAFTTokenStats`, each ``[b, s]``) when
``config.stats``. :func:`reduce_eaft_loss` turns both into Megatron's ``(loss_sum, num_tokens,
report)`` with the report entries below, each ``[numerator, num_tokens]`` so Megatron divides
sums over the global batch by the global number of supervised tokens:

=======================  ========================================================================
``lm loss``              plain cross-entropy, what SFT reports (always)
``<loss_type> loss``     ``w_t * CE_t``, the objective, when ``loss_type`` is not ``sft``
``gate weight``          mean ``w_t`` (1 for sft)
``entropy``              mean ``H_t`` in nats (top-K or full, as the gate uses)
``confident conflicts``  share of tokens with ``min(H_t / ln K, 1) < conflict_entropy`` and
                         ``p_t(y_t) < conflict_prob`` (both 0.15 by default): the model is sure
                         (gate weight < 0.15 at alpha=1) and the label is not what it is sure of.
                         A fixed-threshold version of the paper's pilot, which hard-masked the
                         bottom 15% of both entropy and probability per batch (quantiles do not
                         add up over micro-batches and ranks; thresholds do).
=======================  ========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..ops import ENTROPY_MODES, IMPLS, LOSS_TYPES, EAFTTokenStats, validate_gate_options

__all__ = [
    "EAFTLossConfig",
    "EAFTLanguageModelLoss",
    "eaft_loss_installed",
    "eaft_output_processor",
    "install_eaft_loss",
    "language_modules",
    "reduce_eaft_loss",
    "uninstall_eaft_loss",
]

IGNORE_INDEX = -100
REPORT_KEYS = ("lm loss", "gate weight", "entropy", "confident conflicts")


@dataclass(frozen=True)
class EAFTLossConfig:
    """How the installed loss weights each token (see ``eaft_megatron.ops.gates``)."""

    loss_type: str = "eaft"
    """``sft`` (w=1), ``dft`` (w=p_target**alpha) or ``eaft`` (w=(H/ln top_k)**alpha)."""
    top_k: int = 20
    """K of the top-K entropy and of the ``ln K`` normaliser."""
    alpha: float = 1.0
    """Exponent of the gate."""
    entropy: str = "topk"
    """``topk`` (the paper) or ``full`` (entropy over the whole vocabulary)."""
    stats: bool = True
    """Compute and attach per-token statistics (free for eaft; adds the top-K pass for sft/dft)."""
    conflict_entropy: float = 0.15
    """A token is confident when ``min(H / ln top_k, 1)`` is below this."""
    conflict_prob: float = 0.15
    """... and conflicting when the label's probability is below this."""
    ignore_index: int = IGNORE_INDEX
    """Label value of unsupervised tokens."""
    vocab_size: int | None = None
    """The real vocabulary size when the model's output layer is padded (Megatron pads to a
    multiple of 128 x TP): logits of ids ``>= vocab_size`` are excluded from the softmax, as in
    the Hugging Face model (a converted checkpoint's padding rows are zeros, whose logits would
    otherwise add ``pad * exp(0)`` to every partition function). None: use every logit, as
    Megatron's own loss does."""
    impl: str = "auto"
    """Kernels of the loss op: ``auto`` (Triton on CUDA, PyTorch on CPU), ``triton`` or
    ``torch`` (see ``vocab_parallel_eaft_cross_entropy``)."""

    def __post_init__(self) -> None:
        validate_gate_options(loss_type=self.loss_type, top_k=self.top_k, alpha=self.alpha,
                              entropy=self.entropy)
        for name in ("conflict_entropy", "conflict_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 or None, got {self.vocab_size}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> "EAFTLossConfig":
        """From Megatron-LM arguments parsed with :func:`add_eaft_args` (plus ``overrides``)."""
        kwargs = dict(loss_type=args.loss_type, top_k=args.eaft_top_k, alpha=args.eaft_alpha,
                      entropy=args.eaft_entropy, stats=not args.no_eaft_stats,
                      conflict_entropy=args.eaft_conflict_entropy,
                      conflict_prob=args.eaft_conflict_prob,
                      impl=getattr(args, "eaft_impl", "auto"))
        kwargs.update(overrides)
        return cls(**kwargs)


def _language_module_cls():
    try:
        from megatron.core.models.common.language_module.language_module import LanguageModule
    except ImportError as e:
        raise ImportError(
            "eaft_megatron.megatron needs megatron.core.models.common.language_module."
            f"language_module.LanguageModule (megatron-core >= 0.19): {e}"
        ) from e
    if not hasattr(LanguageModule, "compute_language_model_loss"):
        raise ImportError("megatron-core's LanguageModule has no compute_language_model_loss: "
                          "this megatron-core version is not supported")
    return LanguageModule


def language_modules(model: Any) -> list:
    """The ``LanguageModule`` instances in a model chunk or a list of chunks, unwrapping
    ``DistributedDataParallel`` / ``Float16Module`` (their ``.module``)."""
    language_module = _language_module_cls()
    chunks = model if isinstance(model, (list, tuple)) else [model]
    found = []
    for chunk in chunks:
        module = chunk
        while not isinstance(module, language_module) and hasattr(module, "module"):
            module = module.module
        if not isinstance(module, language_module):
            raise TypeError(f"{type(chunk).__name__} is not (and does not wrap) a megatron-core "
                            "LanguageModule such as GPTModel")
        found.append(module)
    return found


def _mask_padded_vocab_(logits: torch.Tensor, vocab_size: int, group: Any) -> None:
    """Set this rank's logits of padded ids (``>= vocab_size``) to a huge negative value, in
    place: they drop out of the softmax, the top-K and the entropy (exp underflows to 0; a finite
    value keeps ``0 * log 0`` terms at 0) and receive no gradient. Only the rank(s) holding the
    padding touch anything (``[s, b, pad]``); the logits are the output layer's fresh output,
    used by nothing after the loss."""
    import torch.distributed as dist

    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    local = logits.shape[-1]
    first_padded = max(vocab_size - rank * local, 0)
    if first_padded < local:
        logits[..., first_padded:] = torch.finfo(logits.dtype).min / 2


def _batch_major(out: Any, with_stats: bool) -> torch.Tensor:
    """The op's ``[s, b]`` result as Megatron's loss ``[b, s]``, statistics as ``.eaft_stats``."""
    loss, stats = out if with_stats else (out, None)
    loss = loss.transpose(0, 1).contiguous()
    if stats is not None:
        loss.eaft_stats = EAFTTokenStats(*(None if t is None else t.transpose(0, 1)
                                           for t in stats))
    return loss


class EAFTLanguageModelLoss:
    """The ``compute_language_model_loss`` installed on one model instance.

    ``(labels [b, s], logits [s, b, V/tp]) -> loss [b, s]`` float32 ``w_t * CE_t``, 0 where the
    label is ``ignore_index``; with ``config.stats`` the result carries ``.eaft_stats``
    (:class:`EAFTTokenStats`, ``[b, s]`` views). Collectives: one all-gather over the model's
    tensor-parallel group in forward (see ``vocab_parallel_eaft_cross_entropy``).
    """

    _eaft_megatron_marker = True

    def __init__(self, module: Any, config: EAFTLossConfig) -> None:
        self.__wrapped__ = module.compute_language_model_loss  # the class's bound method
        self._module_tp_group = lambda: getattr(module, "tp_group", None)
        self.config = config

    def __call__(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        from ..ops import vocab_parallel_eaft_cross_entropy

        c = self.config
        group = self._module_tp_group()
        if c.vocab_size is not None:
            _mask_padded_vocab_(logits, c.vocab_size, group)
        target = labels.transpose(0, 1)  # [b, s] -> [s, b], like Megatron's own loss
        out = vocab_parallel_eaft_cross_entropy(
            logits, target, loss_type=c.loss_type, top_k=c.top_k, alpha=c.alpha,
            entropy=c.entropy, ignore_index=c.ignore_index, tp_group=group,
            return_stats=c.stats, impl=c.impl,
        )
        return _batch_major(out, c.stats)


def eaft_output_processor(*, hidden_states, output_layer, output_weight, labels, context,
                          **unused: Any) -> torch.Tensor:
    """``GPTModel.forward(..., output_processor=eaft_output_processor,
    output_processor_context=config)``: the output layer and the EAFT loss fused
    (:func:`fused_linear_eaft_cross_entropy`), so the logits are never materialised.

    Megatron-Core >= 0.19 calls it with the decoder's final hidden states ``[s(/tp), b, h]``;
    it returns what ``compute_language_model_loss`` would (``[b, s]`` ``w_t * CE_t``, with
    ``.eaft_stats``), or the logits ``[b, s, V/tp]`` when there are no labels (inference).
    """
    from ..ops import fused_linear_eaft_cross_entropy

    if labels is None:
        logits, _ = output_layer(hidden_states, weight=output_weight)
        return logits.transpose(0, 1).contiguous()
    c: EAFTLossConfig = context
    weight = output_weight if output_weight is not None else output_layer.weight
    out = fused_linear_eaft_cross_entropy(
        hidden_states, weight, labels.transpose(0, 1),
        sequence_parallel=bool(getattr(output_layer, "sequence_parallel", False)),
        loss_type=c.loss_type, top_k=c.top_k, alpha=c.alpha, entropy=c.entropy,
        ignore_index=c.ignore_index, tp_group=getattr(output_layer, "tp_group", None),
        return_stats=c.stats, vocab_size=c.vocab_size, impl=c.impl,
    )
    return _batch_major(out, c.stats)


def install_eaft_loss(model: Any, config: EAFTLossConfig | None = None) -> Any:
    """Make every language module in ``model`` compute the EAFT-family loss; returns ``model``.

    ``model``: a ``GPTModel`` (any ``LanguageModule``), a wrapped one, or the list of chunks
    Megatron-LM builds (pipeline stages, virtual chunks). Idempotent: on an installed module
    only the config is replaced. Imports megatron-core lazily; ``ImportError`` names a missing
    symbol.
    """
    config = config or EAFTLossConfig()
    for module in language_modules(model):
        current = module.__dict__.get("compute_language_model_loss")
        if getattr(current, "_eaft_megatron_marker", False):
            current.config = config
        elif current is not None:
            raise RuntimeError(f"{type(module).__name__} already has an instance-level "
                               "compute_language_model_loss not installed by eaft_megatron")
        else:
            module.compute_language_model_loss = EAFTLanguageModelLoss(module, config)
    return model


def uninstall_eaft_loss(model: Any) -> bool:
    """Restore Megatron's own loss on every language module of ``model``; idempotent.

    Returns True if something was uninstalled.
    """
    removed = False
    for module in language_modules(model):
        current = module.__dict__.get("compute_language_model_loss")
        if getattr(current, "_eaft_megatron_marker", False):
            del module.compute_language_model_loss
            removed = True
    return removed


def eaft_loss_installed(model: Any) -> bool:
    """Whether every language module of ``model`` has the EAFT loss installed."""
    return all(getattr(m.__dict__.get("compute_language_model_loss"), "_eaft_megatron_marker",
                       False) for m in language_modules(model))


def reduce_eaft_loss(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    config: EAFTLossConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron's per-token loss contract for one micro-batch (``--calculate-per-token-loss``).

    ``loss_mask``: ``[b, s]`` (or any shape with as many elements as ``output_tensor``), 1 for
    supervised tokens. ``output_tensor``: the model's per-token loss ``[b, s]``, from the
    installed EAFT loss (statistics read from ``.eaft_stats``) or from Megatron's own CE (then
    it is the plain CE and only ``lm loss`` is reported).

    Returns ``(loss_sum, num_tokens, report)``: the sum of the masked per-token loss (the
    schedule back-propagates it; ``finalize_model_grads`` divides the gradients by the global
    token count), the int token count, and ``{key: float32 [numerator, num_tokens]}``. No
    collective; Megatron sums the report over micro-batches and data-parallel ranks.
    """
    config = config or EAFTLossConfig()
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    count = mask.sum().detach()

    def entry(values: torch.Tensor) -> torch.Tensor:
        total = torch.sum(values.reshape(-1).float() * mask).detach()
        return torch.stack([total, count])

    stats: EAFTTokenStats | None = getattr(output_tensor, "eaft_stats", None)
    if stats is None:
        return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), count])}
    report = {"lm loss": entry(stats.cross_entropy)}
    loss_type = getattr(config, "loss_type", "eaft")
    if loss_type != "sft":
        report[f"{loss_type} loss"] = torch.stack([loss_sum.detach(), count])
    report["gate weight"] = entry(stats.weight)
    report["entropy"] = entry(stats.entropy)
    normalised = torch.clamp(stats.entropy / math.log(config.top_k), max=1.0)
    conflicts = (normalised < config.conflict_entropy) & (stats.target_prob < config.conflict_prob)
    report["confident conflicts"] = entry(conflicts)
    return loss_sum, num_tokens, report


# Re-exported for add_eaft_args' choices.
_LOSS_TYPES, _ENTROPY_MODES = LOSS_TYPES, ENTROPY_MODES
