"""The one patcher: replace a module or class attribute, remember the original, put it back.

Megatron-LM 0.19 has no callbacks and megatron-core assumes CUDA in places, so this project
changes attributes of their modules: the CPU layer (:mod:`.cpu`), the distributed optimizer's
resume fixes (:mod:`.optimizer`), the safe checkpoint readers
(:mod:`eaft_megatron.checkpoint.safe_load`), the trainer's hooks on the training loop
(``eaft_megatron.train``: metrics, guard, landscape). Every one goes through here:

- :func:`patch` wraps (``owner.name = make(original)``), :func:`replace` substitutes a value;
  either records ``(owner, name, original)`` in the caller's ``registry`` (a list), and the
  new callable carries ``__wrapped__ = original``;
- :func:`unpatch` restores a registry, newest first;
- a missing attribute is an ``ImportError`` naming it (the library changed under us).
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["patch", "replace", "unpatch"]

Registry = list[tuple[Any, str, Any]]


def replace(owner: Any, name: str, new: Any, registry: Registry) -> None:
    """``owner.name = new``; the original remembered in ``registry`` for :func:`unpatch`."""
    if not hasattr(owner, name):
        raise ImportError(f"eaft_megatron expected {getattr(owner, '__name__', owner)}.{name} "
                          f"(megatron-core / Megatron-LM 0.19, torch)")
    original = getattr(owner, name)
    if callable(new) and callable(original):
        try:
            new.__wrapped__ = original
        except (AttributeError, TypeError):  # a class or builtin that takes no attributes
            pass
    registry.append((owner, name, original))
    setattr(owner, name, new)


def patch(owner: Any, name: str, make: Callable[[Callable], Callable], registry: Registry) -> None:
    """``owner.name = make(original)``; remembered in ``registry`` for :func:`unpatch`."""
    if not hasattr(owner, name):
        raise ImportError(f"eaft_megatron expected {getattr(owner, '__name__', owner)}.{name} "
                          f"(megatron-core / Megatron-LM 0.19, torch)")
    replace(owner, name, make(getattr(owner, name)), registry)


def unpatch(registry: Registry) -> None:
    """Undo the patches of ``registry``, newest first."""
    while registry:
        owner, name, original = registry.pop()
        setattr(owner, name, original)
