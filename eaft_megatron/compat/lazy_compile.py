"""``torch.compile`` applied on a function's first call instead of at import.

megatron-core decorates helpers with ``torch.compile`` when their modules are imported
(``megatron/core/jit.py`` sets ``jit_fuser = torch.compile``; ``fusions/*.py``,
``transformer/moe/router.py``, ``transformer/utils.py`` ... use it), and ``torch.compile(fn)``
imports TorchDynamo and inductor's ``compile_fx``: about 2 of the ~6 CPU seconds of
``import megatron.core, megatron.training`` (measured on a 2-core machine), paid by every rank of
every launch, although on CPU the trainer turns the fusions off and most of these helpers never
run. :func:`defer_torch_compile` replaces ``torch.compile`` in this process by
:func:`lazy_compile`, which returns a wrapper that calls the real ``torch.compile`` with the same
options on the first call and the compiled function from then on: the same compiled function,
built when it is first needed (nothing at all when it is never called). Modules, and anything
else that is not a plain function, are compiled at once as before.

Only the command-line entry points install it (the trainer, ``eaft-megatron``), before megatron
is imported; :func:`restore` undoes it.

``EAGER = True`` makes the deferred functions that have not compiled yet run as plain Python
instead; the CPU layer (``compat.cpu``) sets it while installed. On CPU, inductor needs a C++
toolchain and costs about a second per compiled helper per process (megatron's MoE router bias
update, the gated attention output of Qwen3.5 / Qwen3-Next) for fusions that bring a CPU run
nothing; the computation is the same.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

__all__ = ["EAGER", "defer_torch_compile", "lazy_compile", "restore"]

_REAL: Callable[..., Any] | None = None  # torch.compile while ours is installed
EAGER = False  # True: deferred functions not compiled yet run uncompiled


def _real_compile() -> Callable[..., Any]:
    import torch

    return _REAL if _REAL is not None else torch.compile


def lazy_compile(model: Any = None, /, **options: Any) -> Any:
    """``torch.compile(model, **options)``, deferred to the first call when ``model`` is a plain
    function; used bare (``@lazy_compile``) or with options (``@lazy_compile(mode=...)``)."""
    if model is None:
        return lambda fn: lazy_compile(fn, **options)
    if not inspect.isfunction(model):
        return _real_compile()(model, **options)
    compiled: Callable[..., Any] | None = None

    @functools.wraps(model)
    def first_call_compiles(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            if EAGER:
                return model(*args, **kwargs)
            compiled = _real_compile()(model, **options)
        return compiled(*args, **kwargs)

    # What torch.compile's own wrapper carries (torch/_dynamo/eval_frame.py): TorchDynamo tracing
    # an outer compiled region inlines the original function instead of entering this wrapper,
    # and unwrapping (compat/deltanet.eager, torch's innermost_fn) finds the original.
    wrapper = first_call_compiles
    wrapper._torchdynamo_inline = model  # type: ignore[attr-defined]
    wrapper._torchdynamo_orig_callable = model  # type: ignore[attr-defined]
    wrapper._torchdynamo_wrapper_id = id(wrapper)  # type: ignore[attr-defined]
    wrapper._eaft_lazy_compile = True  # type: ignore[attr-defined]
    return wrapper


def defer_torch_compile() -> None:
    """Install :func:`lazy_compile` as ``torch.compile`` (idempotent). Functions megatron
    decorated before this call keep their eager compilation."""
    global _REAL
    import torch

    if _REAL is None:
        _REAL = torch.compile
        torch.compile = lazy_compile  # type: ignore[assignment]


def restore() -> None:
    """Put the real ``torch.compile`` back (wrappers made meanwhile stay lazy)."""
    global _REAL
    import torch

    if _REAL is not None:
        torch.compile = _REAL  # type: ignore[assignment]
        _REAL = None
