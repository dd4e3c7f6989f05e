"""Resuming megatron-core's distributed optimizer (``--use-distributed-optimizer``): three
megatron-core 0.19.2 defects that make such a resume fail or silently change training, worked
around by :func:`install_optimizer_fixes` (the trainer installs it).

1. Without TransformerEngine or apex, megatron-core 0.19.2's ``DistributedOptimizer.state_dict``
reads Adam's ``step`` from the torch optimizer's per-parameter state when neither TE nor apex
is installed (``HAVE_APEX_OR_TE`` false: torch's own Adam, CPU or a bare GPU install) and
asserts that exactly one value exists. Megatron-LM's ``load_checkpoint`` calls it on a freshly built
optimizer to lay out what it is about to load, when that state is still empty: every resume
with ``--use-distributed-optimizer`` fails with a bare ``AssertionError``. The value only fills
the param-group template; ``load_state_dict`` then sets every parameter's ``step`` from the
checkpoint. The fix makes the empty case give a template step of 0 (the loaded step replaces
it); an optimizer that has stepped is untouched.

2. ``load_parameter_state_from_dp_reshardable`` (the default ``dp_reshardable`` layout) copies
the loaded values into the optimizer's main parameters without ``torch.no_grad()`` (its
siblings for the other layouts have it). Where a main parameter is a view of a model parameter
(fp32 training: no separate fp32 copy) that ``copy_`` raises "a view of a leaf Variable that
requires grad is being used in an in-place operation". The fix runs it under ``no_grad``.

3. Without TE/apex, ``load_state_dict`` does not restore Adam's ``step``: the saved count (in
the param groups) is set on the torch state, then overwritten by the parameter-state load with
the template's, and every parameter's state holds the *same* tensor, which torch's Adam
increments in place once per parameter. Measured on a tiny model resumed at step 2: the next
update used steps 1..10 instead of 3 (wrong bias correction: parameters 1e-4 off after one
update, the next checkpoint saying step 10). The fix sets, after loading, each parameter's own
``step`` tensor to the saved count.
"""

from __future__ import annotations

from typing import Any

__all__ = ["install_optimizer_fixes", "uninstall_optimizer_fixes"]

_saved: list = []


def _wrap_state_dict(original):
    def state_dict(self: Any):
        import torch

        from megatron.core.optimizer import distrib_optimizer

        inner = self.optimizer
        if distrib_optimizer.HAVE_APEX_OR_TE or \
                any("step" in s for s in getattr(inner, "state", {}).values()):
            return original(self)
        real = inner.state_dict

        def with_template_step():
            sd = real()
            sd["state"] = {0: {"step": torch.tensor(0.0)}}  # read for ``step`` only
            return sd

        inner.state_dict = with_template_step
        try:
            return original(self)
        finally:
            del inner.state_dict

    return state_dict


def _wrap_load_state_dict(original):
    def load_state_dict(self: Any, state_dict: Any):
        import torch

        from megatron.core.optimizer import distrib_optimizer

        result = original(self, state_dict)
        if distrib_optimizer.HAVE_APEX_OR_TE:
            return result
        steps = {float(g["step"]) for g in state_dict["optimizer"]["param_groups"]
                 if "step" in g}
        if len(steps) == 1:  # the saved count (megatron stores it in the param groups)
            step = steps.pop()
            for state in self.optimizer.state.values():
                if "step" in state:  # one counter per parameter, with the saved value
                    state["step"] = torch.tensor(step, dtype=state["step"].dtype)
        return result

    return load_state_dict


def _no_grad(original):
    import torch

    return torch.no_grad()(original)


def install_optimizer_fixes() -> None:
    """Idempotent; see the module doc."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from .patching import patch

    if not _saved:
        patch(DistributedOptimizer, "state_dict", _wrap_state_dict, _saved)
        patch(DistributedOptimizer, "load_parameter_state_from_dp_reshardable", _no_grad, _saved)
        patch(DistributedOptimizer, "load_state_dict", _wrap_load_state_dict, _saved)


def uninstall_optimizer_fixes() -> None:
    from .patching import unpatch

    unpatch(_saved)
