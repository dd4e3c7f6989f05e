"""Wrapping functions of ``megatron.training.training`` that its loop calls by name.

Megatron-LM 0.19 has no callbacks; the trainer's hooks (:mod:`.metrics`, :mod:`.guard`) replace
module attributes with wrappers that call the original, and put them back on uninstall.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["patch", "unpatch"]


def patch(owner: Any, name: str, make: Callable[[Callable], Callable],
          registry: list[tuple[Any, str, Any]]) -> None:
    """``owner.name = make(original)``; remembered in ``registry`` for :func:`unpatch`."""
    if not hasattr(owner, name):
        raise ImportError(f"eaft_megatron.train expected {owner.__name__}.{name} "
                          "(megatron-core 0.19's training loop)")
    original = getattr(owner, name)
    wrapper = make(original)
    wrapper.__wrapped__ = original
    registry.append((owner, name, original))
    setattr(owner, name, wrapper)


def unpatch(registry: list[tuple[Any, str, Any]]) -> None:
    """Undo the patches of ``registry``, newest first."""
    while registry:
        owner, name, original = registry.pop()
        setattr(owner, name, original)
