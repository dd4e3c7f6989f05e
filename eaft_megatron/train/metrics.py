"""``metrics.jsonl``: one JSON object per logged training iteration and per evaluation.

Megatron-LM 0.19 has no logging callback, so the entry point wraps three functions of
``megatron.training.training`` that the loop calls by name (see :func:`install_metrics_hooks`):
``training_log`` (sees each iteration's data-parallel-reduced losses),
``evaluate_and_print_results`` (knows the iteration and whether it is the validation or test
set) and ``evaluate`` (returns the reduced evaluation losses). Megatron's own stdout /
TensorBoard / W&B logging is unchanged, except that its validation line keeps a ``PPL`` for
``lm loss`` only (:func:`_without_meaningless_ppl`).

Records (written by the last rank, which holds the last pipeline stage's reduced values; floats
at full precision, a line is flushed as soon as it is written):

    {"kind": "train", "iteration": 10, "consumed_samples": 80, "iterations_averaged": 10,
     "loss_type": "eaft", "loss": 2.31, "lm_loss": 3.02, "gate_weight": 0.71, "entropy": 2.13,
     "confident_conflicts": 0.004, "learning_rate": 1e-05, "grad_norm": 1.3, "skipped": 0}
    {"kind": "valid", "iteration": 10, "final": false, "loss_type": "eaft", "loss": ..., ...}
    {"kind": "restart", "iteration": 20, "checkpoint": "runs/x/iter_0000020", ...}
    {"kind": "start", "iteration": 0, "checkpoint": "ckpt/qwen3-mcore", "finetune": true, ...}

A run writes ``start`` (fresh) or ``restart`` (resumed from a checkpoint of its own) first. After
a crash, the records of iterations past the resumed checkpoint appear twice: the ones after the
last ``restart`` record are the ones the checkpoints continue. ``final`` marks the evaluation
Megatron runs after training (``--eval-only`` included) apart from the periodic ones.

``loss`` is the optimised objective (``w*CE`` summed / supervised tokens; equal to ``lm_loss``
for sft), ``lm_loss`` the plain cross-entropy over the same tokens. Train values are averaged over
the iterations since the previous record (Megatron's ``--log-interval``; the first iteration of
a run is always logged, as on stdout), evaluation values over the whole evaluation.

Mixture-of-experts models add two figures to every ``train`` record (training forwards only;
evaluations route without them):

- ``load_balancing_loss``: megatron-core's switch load-balancing loss *without* its coefficient
  (``E * sum_i f_i * P_i``: ``f_i`` the share of the micro-batch's top-k assignments that went to
  expert i, ``P_i`` its mean router probability; 1.0 when balanced), computed per micro-batch and
  MoE layer, averaged over the layers and micro-batches of the iteration (and the data-parallel
  ranks): the value megatron prints as ``load_balancing_loss``, taken from its MoE metrics
  tracker. Present when the aux loss is on (``router_aux_loss_coef`` > 0 or
  ``--moe-aux-loss-coeff``); megatron-core adds ``coeff * load_balancing_loss`` to the
  gradient only, so ``loss`` and ``lm_loss`` never include it. Other auxiliary losses the
  tracker reports (``z_loss``, ``seq_load_balancing_loss``, ...) appear under their names.
- ``expert_load_imbalance``: for each MoE layer, the largest number of tokens any expert received
  over the whole global batch divided by the mean per expert (``tokens * top-k / experts``),
  averaged over the MoE layers; 1.0 is a perfectly even load, ``experts / top-k`` the worst.
  ``expert_load_imbalance_max``: the same ratio of the worst layer. Counted from the routers'
  choices (``routing_map``, as the expert-bias update counts them) summed over the micro-batches,
  the tensor/data/context-parallel ranks and the pipeline stages.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from typing import Any

import torch

from ..compat.cpu import run_device
from ..compat.patching import patch, unpatch

__all__ = ["ExpertLoad", "MetricsLog", "expert_load", "install_metrics_hooks", "metric_name",
           "uninstall_metrics_hooks"]

_saved: list[tuple[Any, str, Any]] = []


def metric_name(key: str, loss_type: str) -> str:
    """JSON name of a Megatron report key (``"eaft loss"`` -> ``"loss"``, ``"lm loss"`` ->
    ``"lm_loss"``, ``"gate weight"`` -> ``"gate_weight"``)."""
    if key == f"{loss_type} loss":
        return "loss"
    return key.replace(" ", "_")


class ExpertLoad:
    """Tokens per expert of every MoE layer in the training forwards since the last
    :meth:`reduce` (forward hooks on megatron-core's ``TopKRouter``; see the module doc)."""

    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}  # layer number (1-based, global) -> [experts]
        self.shape: tuple[int, int] | None = None  # (layers incl. MTP, experts) once attached

    def attach(self, model: torch.nn.Module) -> None:
        """Count the routing decisions of the routers in ``model`` (a ``GPTModel`` chunk; a
        pipeline stage without MoE layers still takes part in :meth:`reduce`)."""
        from megatron.core.transformer.moe.router import TopKRouter

        config = model.config
        if not config.num_moe_experts:
            return
        self.shape = (config.num_layers + (config.mtp_num_layers or 0), config.num_moe_experts)
        for module in model.modules():
            if isinstance(module, TopKRouter):
                module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, router: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if not (router.training and torch.is_grad_enabled()):  # not evaluation nor recompute
            return
        routing_map = output[1]  # [tokens, experts] bool
        padding = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
        if padding is not None:  # True = padding, as megatron-core's expert-bias count
            routing_map = routing_map & ~padding.reshape(-1, 1)
        layer = int(router.layer_number) + (router.config.num_layers if router.is_mtp_layer
                                            else 0)
        counts = routing_map.sum(dim=0).to(torch.float64)
        self.counts[layer] = self.counts[layer] + counts if layer in self.counts else counts

    def reduce(self) -> dict[str, float]:
        """The imbalance figures over every rank's counts (a collective: all ranks call it);
        resets the counts. Empty when no router counted anything."""
        if self.shape is None:
            return {}
        table = torch.zeros(self.shape, dtype=torch.float64)
        for layer, counts in self.counts.items():
            table[layer - 1] = counts.cpu()
        self.counts = {}
        table = table.to(run_device())
        # every rank of the job (tensor x context x data x pipeline): one collective
        torch.distributed.all_reduce(table)
        table = table[table.sum(dim=1) > 0]
        if not len(table):
            return {}
        ratio = table.max(dim=1).values / table.mean(dim=1)
        return {"expert_load_imbalance": float(ratio.mean()),
                "expert_load_imbalance_max": float(ratio.max())}


expert_load = ExpertLoad()  # attached by the model provider to MoE models


class MetricsLog:
    """Appends records to ``<directory>/metrics.jsonl`` on one rank; a no-op elsewhere."""

    def __init__(self, directory: str | None, *, enabled: bool, loss_type: str) -> None:
        self.loss_type = loss_type
        self.path = os.path.join(directory, "metrics.jsonl") if directory and enabled else None
        if self.path:
            os.makedirs(directory, exist_ok=True)
        self._sums: dict[str, float] = {}
        self._count = 0
        self._skipped = 0

    def _values(self, loss_dict: dict[str, Any], scale: float = 1.0) -> dict[str, float]:
        out = {metric_name(k, self.loss_type): float(v) * scale for k, v in loss_dict.items()}
        if "loss" not in out and "lm_loss" in out:  # sft (or Megatron's own loss)
            out["loss"] = out["lm_loss"]
        return out

    def write(self, record: dict[str, Any]) -> None:
        if not self.path:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def on_training_iteration(self, *, loss_dict: dict, iteration: int, skipped: int,
                              learning_rate: float | None, grad_norm: float | None,
                              consumed_samples: int, log_now: bool) -> None:
        if skipped:
            self._skipped += 1
        else:
            self._count += 1
            for key, value in loss_dict.items():
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
        if not log_now:
            return
        record: dict[str, Any] = dict(kind="train", iteration=iteration,
                                      consumed_samples=consumed_samples,
                                      iterations_averaged=self._count, loss_type=self.loss_type)
        if self._count:
            record.update(self._values(self._sums, 1.0 / self._count))
        record.update(learning_rate=learning_rate, grad_norm=grad_norm, skipped=self._skipped,
                      time=time.time())
        self.write(record)
        self._sums, self._count, self._skipped = {}, 0, 0

    def on_start(self, *, resumed: bool, iteration: int, checkpoint: str | None,
                 finetune: bool) -> None:
        self.write(dict(kind="restart" if resumed else "start", iteration=iteration,
                        checkpoint=checkpoint, finetune=finetune, loss_type=self.loss_type,
                        time=time.time()))

    def on_evaluation(self, *, kind: str, iteration: int, loss_dict: dict,
                      final: bool = False) -> None:
        record = dict(kind=kind, iteration=iteration, final=final, loss_type=self.loss_type)
        record.update(self._values({k: float(v) for k, v in loss_dict.items()}))
        record["time"] = time.time()
        self.write(record)


def _without_meaningless_ppl(printed: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Megatron's validation line gives every reported key a ``PPL`` (``exp(value)``); only the
    plain cross-entropy's (``lm loss``) is a perplexity: the EAFT/DFT objective is weighted, and
    a gate weight, an entropy or a share of conflicts has none. The others' are dropped (and
    the dashed rules around the line follow its new length)."""
    out = []
    for p, k in printed:
        if p and isinstance(p[0], str) and " PPL: " in p[0]:
            parts = p[0].split(" | ")
            p = (" | ".join(x for x in parts if " PPL: " not in x or
                            x.startswith("lm loss PPL: ")), *p[1:])
        out.append((p, k))
    for i, (p, k) in enumerate(out):  # '-' * (len(line) + 1) above and below each line
        if p and isinstance(p[0], str) and p[0] and not p[0].strip("-"):
            near = [q[0][0] for q in out[max(i - 1, 0):i + 2]
                    if q[0] and isinstance(q[0][0], str) and q[0][0].strip("-")]
            if near:
                out[i] = (("-" * (len(near[0]) + 1), *p[1:]), k)
    return out


def install_metrics_hooks(log: MetricsLog) -> None:
    """Wrap Megatron's ``training_log``, ``evaluate_and_print_results`` and ``evaluate`` so
    they feed ``log``, and megatron-core's ``MoEMetricsTracker.report`` (called inside
    ``training_log``) to see the MoE aux losses; idempotent per process (a second call
    replaces the log)."""
    uninstall_metrics_hooks()
    import megatron.training.training as loop
    from megatron.training import get_args

    current = {"kind": "valid", "iteration": 0, "final": False}
    moe_losses: dict[str, float] = {}  # this iteration's MoE aux losses, as megatron reports them

    def wrap_training_log(original):
        signature = inspect.signature(original)

        def training_log(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            margs = get_args()
            iteration = a["iteration"]
            moe_losses.clear()
            result = original(*args, **kwargs)  # reports (and clears) the MoE aux losses
            values = dict(a["loss_dict"])
            values.update(moe_losses)
            values.update(expert_load.reduce())  # every rank: a collective
            log.on_training_iteration(
                loss_dict=values, iteration=iteration, skipped=int(a["skipped_iter"]),
                learning_rate=a["learning_rate"],
                grad_norm=None if a["grad_norm"] is None else float(a["grad_norm"]),
                consumed_samples=int(margs.consumed_train_samples),
                log_now=iteration % margs.log_interval == 0 or bool(a.get("is_first_iteration")))
            return result

        return training_log

    def wrap_moe_report(original):
        def report(self, *args, **kwargs):
            """Megatron adds the reduced ``*loss`` figures of this iteration into the
            interval's ``total_loss_dict``; take them on their way there."""
            total = kwargs.get("total_loss_dict")
            if total is None:
                return original(self, *args, **kwargs)
            mine: dict[str, Any] = {}
            text = original(self, *args, **{**kwargs, "total_loss_dict": mine})
            for key, value in mine.items():
                total[key] = total[key] + value if key in total else value
                moe_losses[key] = float(value)
            return text

        return report

    def wrap_evaluate_and_print(original):
        signature = inspect.signature(original)

        def evaluate_and_print_results(*args, **kwargs):
            a = signature.bind(*args, **kwargs).arguments
            prefix = str(a.get("prefix", ""))  # "iteration N" periodic, "... on X set" final
            current["kind"] = "test" if "test set" in prefix else "valid"
            current["final"] = " set" in prefix
            current["iteration"] = a.get("iteration", 0)
            printed: list[tuple[tuple, dict]] = []
            print_last = loop.print_rank_last  # its validation lines, held back and cleaned
            loop.print_rank_last = lambda *p, **k: printed.append((p, k))
            try:
                return original(*args, **kwargs)
            finally:
                loop.print_rank_last = print_last
                for p, k in _without_meaningless_ppl(printed):
                    print_last(*p, **k)

        return evaluate_and_print_results

    def wrap_evaluate(original):
        def evaluate(*args, **kwargs):
            result = original(*args, **kwargs)
            loss_dict, _, timelimit = result
            if not timelimit and loss_dict:
                log.on_evaluation(kind=current["kind"], iteration=current["iteration"],
                                  loss_dict=loss_dict, final=current["final"])
            return result

        return evaluate

    from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker

    patch(loop, "training_log", wrap_training_log, _saved)
    patch(MoEMetricsTracker, "report", wrap_moe_report, _saved)
    patch(loop, "evaluate_and_print_results", wrap_evaluate_and_print, _saved)
    patch(loop, "evaluate", wrap_evaluate, _saved)


def uninstall_metrics_hooks() -> None:
    unpatch(_saved)
