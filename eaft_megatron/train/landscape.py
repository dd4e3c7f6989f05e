"""The entropy-probability landscape of a model on your data, from the evaluation's own loss pass.

    torchrun ... -m eaft_megatron.train --load CKPT --data-path P --eval-only --eaft-landscape DIR
    torchrun ... -m eaft_megatron.train ... --eaft-landscape DIR --eaft-landscape-interval 100
    eaft-megatron landscape DIR [DIR2] [--out X.png]

Every evaluated supervised token has a normalised entropy ``min(H / ln K, 1)`` (the gate's H,
top-K or full) and a label probability ``p(label)``; the loss op returns both, and the model's
most likely token, from the pass that computes the loss (:class:`EAFTTokenStats`). This module
counts them, per evaluation, into:

``landscape.json``  a ``bins x bins`` histogram (rows: entropy bins from 0 to 1, columns:
                    p(label) bins from 0 to 1; integer counts), the token count, the four
                    quadrants at ``--eaft-conflict-entropy`` / ``--eaft-conflict-prob`` (the
                    ``confident conflicts`` of ``metrics.jsonl``: low entropy AND low
                    probability), the iteration, model, checkpoint and data.
``samples.jsonl``   one line per evaluated conversation, most conflicting first: input file and
                    line (from ``preprocess``'s provenance), supervised tokens, confident
                    conflicts (count and share), mean gate weight -- per evaluated copy (an
                    evaluation cycling over the data counts a conversation ``evaluations``
                    times; the ranking uses the counts per copy); for the ``--eaft-landscape-top``
                    most conflicting ones, the conflicting positions decoded with the tokenizer in
                    ``<checkpoint>/hf``: the label, the model's most likely token, p(label), the
                    normalised entropy and the text before.
``landscape.png``   the histogram as a heatmap (log colour scale), the conflict quadrant
                    outlined, the marginal distributions (needs matplotlib; without it rank 0
                    says so at start and the writer when it skips the file).

With ``--eaft-landscape-interval N`` every evaluation at an iteration that is a multiple of N
(and the final one) writes ``DIR/iter_0000N00/``; ``DIR/`` itself holds the latest. Files are
written atomically by one rank (the last rank, which also writes ``metrics.jsonl``).

Cost and communication: each token is counted once (the statistics are replicated over the
tensor-parallel ranks, so only the last tensor-parallel rank of the last pipeline stage counts),
per micro-batch with a few vectorised operations on the statistics already computed; at the end
of an evaluation ONE collective, a ``gather`` over the data-parallel group of the last pipeline
stage of one fixed-size float64 buffer per rank (histogram, quadrant counts, per-conversation
sums, the conflicting positions: counts below 2**53 are exact in float64). Nothing else is
communicated. Context parallelism is not supported (the statistics are split over the sequence).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import iteration_dir_name
from .landscape_output import share, write_landscape
from .landscape_stats import _Accumulator, unpack_buffers

__all__ = ["Landscape", "active", "add_landscape_args", "check_landscape_args",
           "install_landscape_hooks"]


def add_landscape_args(group: Any) -> None:
    group.add_argument("--eaft-landscape", default=None, metavar="DIR",
                       help="write the entropy-probability landscape of the evaluated data "
                            "(landscape.json, samples.jsonl, landscape.png) into DIR at the final "
                            "evaluation (--eval-only: the only one)")
    group.add_argument("--eaft-landscape-interval", type=int, default=None, metavar="N",
                       help="also at every evaluation whose iteration is a multiple of N, into "
                            "DIR/iter_XXXXXXX/ (DIR holds the latest)")
    group.add_argument("--eaft-landscape-bins", type=int, default=20,
                       help="bins per axis of the histogram (default 20)")
    group.add_argument("--eaft-landscape-top", type=int, default=20,
                       help="decode the conflicting positions of this many most conflicting "
                            "conversations in samples.jsonl (default 20)")


def check_landscape_args(args: Any) -> str | None:
    """A one-line reason the landscape flags cannot work, or None."""
    if not getattr(args, "eaft_landscape", None):
        return None
    if args.eaft_landscape_bins < 1:
        return f"--eaft-landscape-bins must be >= 1, got {args.eaft_landscape_bins}"
    if args.eaft_landscape_interval is not None and args.eaft_landscape_interval < 1:
        return f"--eaft-landscape-interval must be >= 1, got {args.eaft_landscape_interval}"
    if getattr(args, "no_eaft_stats", False):
        return "--eaft-landscape needs the per-token statistics: drop --no-eaft-stats"
    if getattr(args, "context_parallel_size", 1) > 1:
        return "--eaft-landscape does not support --context-parallel-size > 1"
    return None


# -- the trainer's hooks ------------------------------------------------------------------------


class Landscape:
    """Collects during the evaluations that write a landscape; one per trainer process."""

    def __init__(self, args: Any, *, hf_dir: str) -> None:
        self.args = args
        self.directory = Path(args.eaft_landscape)
        self.interval = args.eaft_landscape_interval
        self.hf_dir = str(hf_dir)
        self.data = (args.valid_data_path or args.data_path or args.train_data_path)[0]
        self.writer = args.rank == args.world_size - 1
        if args.rank == 0:
            import importlib.util

            if importlib.util.find_spec("matplotlib") is None:
                from .landscape_output import NO_MATPLOTLIB

                print(f"eaft_megatron.train: warning: --eaft-landscape {args.eaft_landscape}: "
                      f"no landscape.png: {NO_MATPLOTLIB}", flush=True)
        self.contributor: bool | None = None  # known once Megatron built its groups
        self.dp_group = None
        self.current: _Accumulator | None = None
        self.iteration, self.final = 0, False

    def _groups(self) -> None:
        from megatron.core import parallel_state as ps

        if self.contributor is None:
            self.contributor = (ps.is_pipeline_last_stage(ignore_virtual=True) and
                                ps.get_tensor_model_parallel_rank() ==
                                ps.get_tensor_model_parallel_world_size() - 1)
            self.dp_group = ps.get_data_parallel_group() if self.contributor else None

    def capacity_rows(self) -> int:
        """Conversations one rank can see in one evaluation (equal on every rank)."""
        from ..data.provenance import read_document_indices

        args = self.args
        batch = getattr(args, "eval_global_batch_size", None) or args.global_batch_size
        samples = max(1, args.eval_iters) * batch // args.data_parallel_size
        per_sample = int(np.diff(read_document_indices(self.data)).max())
        return samples * per_sample

    def begin(self, iteration: int, final: bool) -> None:
        self.iteration, self.final = iteration, final
        wanted = final or (self.interval is not None and iteration % self.interval == 0)
        self.current = None
        self._groups()
        if wanted and self.contributor:
            args = self.args
            self.current = _Accumulator(args.eaft_landscape_bins, args.eaft_top_k,
                                        args.eaft_conflict_entropy, args.eaft_conflict_prob)

    def hook(self, batch: dict) -> Any:
        """The per-micro-batch callback for the loss function, or None when not collecting."""
        current = self.current
        if current is None:
            return None
        cu, first = batch["cu_seqlens"], batch["first_conversation"]

        def collect(output_tensor: Any) -> None:
            stats = getattr(output_tensor, "eaft_stats", None)
            if stats is not None:
                current.add(stats, cu, first)
        return collect

    def end(self, completed: bool) -> None:
        current, self.current = self.current, None
        if current is None:
            return
        import torch
        import torch.distributed as dist

        capacity = self.capacity_rows()
        buf = torch.from_numpy(current.buffer(capacity))
        if self.args.data_parallel_size > 1:
            # the ONE collective of the landscape: gather over the last stage's DP group
            ranks = dist.get_process_group_ranks(self.dp_group)
            dst = max(ranks)
            if torch.cuda.is_available() and dist.get_backend(self.dp_group) == "nccl":
                buf = buf.cuda()
            gathered = [torch.empty_like(buf) for _ in ranks] if self.args.rank == dst else None
            dist.gather(buf, gathered, dst=dst, group=self.dp_group)
            buffers = [g.cpu().numpy() for g in gathered] if gathered is not None else None
        else:
            buffers = [buf.numpy()]
        if not self.writer or buffers is None or not completed:
            return
        merged = unpack_buffers(buffers, current.bins, capacity)
        targets = [self.directory]
        if self.interval is not None:
            targets.insert(0, self.directory / iteration_dir_name(self.iteration))
        for target in targets:
            write_landscape(target, merged, args=self.args, hf_dir=self.hf_dir, data=self.data,
                            iteration=self.iteration, final=self.final)
        print(f"> eaft_megatron.train: landscape @ {self.iteration}: confident conflicts "
              f"{share(merged['quadrants'][3], merged['quadrants'].sum()):.4g} of "
              f"{int(merged['quadrants'].sum())} tokens -> {targets[0]}", flush=True)


_ACTIVE: list[Landscape] = []
_saved: list = []


def active() -> Landscape | None:
    return _ACTIVE[0] if _ACTIVE else None


def install_landscape_hooks(landscape: Landscape) -> None:
    """Wrap Megatron's ``evaluate_and_print_results`` (iteration, final) and ``evaluate``
    (begin / end of the collection) for ``landscape``."""
    import inspect

    import megatron.training.training as loop

    from ..compat.patching import patch, unpatch

    unpatch(_saved)
    _ACTIVE[:] = [landscape]
    where = {"iteration": 0, "final": False}

    def wrap_evaluate_and_print(original):
        signature = inspect.signature(original)

        def evaluate_and_print_results(*args, **kwargs):
            a = signature.bind(*args, **kwargs).arguments
            where["iteration"] = int(a.get("iteration", 0) or 0)
            where["final"] = " set" in str(a.get("prefix", ""))
            return original(*args, **kwargs)
        return evaluate_and_print_results

    def wrap_evaluate(original):
        def evaluate(*args, **kwargs):
            landscape.begin(where["iteration"], where["final"])
            try:
                result = original(*args, **kwargs)
            except BaseException:
                landscape.current = None
                raise
            landscape.end(completed=not result[2])
            return result
        return evaluate

    patch(loop, "evaluate_and_print_results", wrap_evaluate_and_print, _saved)
    patch(loop, "evaluate", wrap_evaluate, _saved)
