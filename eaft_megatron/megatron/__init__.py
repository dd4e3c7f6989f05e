"""EAFT inside Megatron-Core models and Megatron-LM's training loop.

    from eaft_megatron.megatron import (EAFTLossConfig, add_eaft_args, eaft_model_provider,
                                        install_eaft_loss, reduce_eaft_loss)

=====================  ==========================================================================
``loss.py``            install / uninstall the loss on built models (per instance, every chunk),
                       its config, and the reduction to Megatron's per-token loss contract
``args.py``            ``add_eaft_args`` for Megatron-LM's ``extra_args_provider``
=====================  ==========================================================================

See ``examples/megatron_lm/`` for the lines a user of their own ``pretrain_gpt.py`` adds, and
``eaft_megatron.train`` for the ready entry point. megatron-core is imported only when a model
is touched.
"""

from __future__ import annotations

from typing import Any, Callable

from .args import add_eaft_args
from .loss import (
    EAFTLanguageModelLoss,
    EAFTLossConfig,
    eaft_loss_installed,
    eaft_output_processor,
    install_eaft_loss,
    language_modules,
    reduce_eaft_loss,
    uninstall_eaft_loss,
)

__all__ = [
    "EAFTLanguageModelLoss",
    "EAFTLossConfig",
    "add_eaft_args",
    "eaft_loss_installed",
    "eaft_model_provider",
    "eaft_output_processor",
    "install_eaft_loss",
    "language_modules",
    "reduce_eaft_loss",
    "uninstall_eaft_loss",
]


def eaft_model_provider(provider: Callable[..., Any],
                        config: EAFTLossConfig | Callable[[], EAFTLossConfig] | None = None
                        ) -> Callable[..., Any]:
    """Wrap a Megatron-LM model provider so every chunk it builds gets the EAFT loss.

    ``config``: an :class:`EAFTLossConfig`, or a callable returning one at build time (default:
    ``EAFTLossConfig.from_args(megatron.training.get_args())``).
    """

    def build(*args: Any, **kwargs: Any) -> Any:
        if config is None:
            from megatron.training import get_args

            resolved = EAFTLossConfig.from_args(get_args())
        else:
            resolved = config() if callable(config) else config
        return install_eaft_loss(provider(*args, **kwargs), resolved)

    build.__wrapped__ = provider
    return build
