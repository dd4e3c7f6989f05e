"""EAFT command-line arguments for Megatron-LM's parser (its ``extra_args_provider``).

    args = parse_and_validate_args(extra_args_provider=add_eaft_args)
    config = EAFTLossConfig.from_args(args)
"""

from __future__ import annotations

import argparse

from ..ops import ENTROPY_MODES, IMPLS, LOSS_TYPES
from .loss import EAFTLossConfig

__all__ = ["add_eaft_args"]

_DEFAULTS = EAFTLossConfig()  # the one place the EAFT defaults are written


def add_eaft_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``EAFT`` argument group; returns ``parser`` (Megatron's provider contract).

    ``--loss-type {sft,dft,eaft}``, ``--eaft-top-k``, ``--eaft-alpha``, ``--eaft-entropy
    {topk,full}``, ``--eaft-conflict-entropy`` / ``--eaft-conflict-prob`` (thresholds of the
    logged confident-conflict share), ``--no-eaft-stats`` (log only the losses, skipping the
    top-K pass that ``sft``/``dft`` otherwise add for the statistics), ``--eaft-impl
    {auto,triton,torch}`` (the loss op's kernels). Defaults: the fields of
    :class:`.loss.EAFTLossConfig`.
    """
    group = parser.add_argument_group(title="EAFT (eaft_megatron)")
    group.add_argument("--loss-type", choices=LOSS_TYPES, default=_DEFAULTS.loss_type,
                       help="per-token weight: sft (1), dft (p_target**alpha), "
                            "eaft ((H/ln top_k)**alpha, detached)")
    group.add_argument("--eaft-top-k", type=int, default=_DEFAULTS.top_k,
                       help="K of the top-K entropy and of its ln K normaliser")
    group.add_argument("--eaft-alpha", type=float, default=_DEFAULTS.alpha,
                       help="exponent of the gate")
    group.add_argument("--eaft-entropy", choices=ENTROPY_MODES, default=_DEFAULTS.entropy,
                       help="entropy of the top-K renormalised softmax (the paper) or of the "
                            "full vocabulary (w = min(H/ln top_k, 1)**alpha)")
    group.add_argument("--eaft-conflict-entropy", type=float,
                       default=_DEFAULTS.conflict_entropy,
                       help="logging: a token is confident when min(H/ln top_k, 1) is below this")
    group.add_argument("--eaft-conflict-prob", type=float,
                       default=_DEFAULTS.conflict_prob,
                       help="logging: ... and a conflict when p(label) is below this")
    group.add_argument("--no-eaft-stats", action="store_true",
                       help="do not compute gate weight / entropy / conflict statistics")
    group.add_argument("--eaft-fused-linear", action="store_true",
                       help="fuse the output layer into the loss (Megatron-Core's "
                            "output_processor hook): the logits are never materialised")
    group.add_argument("--eaft-impl", choices=IMPLS, default=_DEFAULTS.impl,
                       help="kernels of the loss op: auto (Triton on CUDA, PyTorch on CPU; "
                            "falls back to PyTorch with a log line when Triton cannot run), "
                            "triton, torch")
    return parser
