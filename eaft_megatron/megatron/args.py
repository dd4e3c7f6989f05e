"""EAFT command-line arguments for Megatron-LM's parser (its ``extra_args_provider``).

    args = parse_and_validate_args(extra_args_provider=add_eaft_args)
    config = EAFTLossConfig.from_args(args)
"""

from __future__ import annotations

import argparse

from ..ops import ENTROPY_MODES, LOSS_TYPES

__all__ = ["add_eaft_args"]


def add_eaft_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``EAFT`` argument group; returns ``parser`` (Megatron's provider contract).

    ``--loss-type {sft,dft,eaft}`` (default eaft), ``--eaft-top-k`` (20), ``--eaft-alpha`` (1.0),
    ``--eaft-entropy {topk,full}`` (topk), ``--eaft-conflict-entropy`` / ``--eaft-conflict-prob``
    (0.15: thresholds of the logged confident-conflict share), ``--no-eaft-stats`` (log only the
    losses, skipping the top-K pass that ``sft``/``dft`` otherwise add for the statistics).
    """
    group = parser.add_argument_group(title="EAFT (eaft_megatron)")
    group.add_argument("--loss-type", choices=LOSS_TYPES, default="eaft",
                       help="per-token weight: sft (1), dft (p_target**alpha), "
                            "eaft ((H/ln top_k)**alpha, detached)")
    group.add_argument("--eaft-top-k", type=int, default=20,
                       help="K of the top-K entropy and of its ln K normaliser")
    group.add_argument("--eaft-alpha", type=float, default=1.0, help="exponent of the gate")
    group.add_argument("--eaft-entropy", choices=ENTROPY_MODES, default="topk",
                       help="entropy of the top-K renormalised softmax (the paper) or of the "
                            "full vocabulary (w = min(H/ln top_k, 1)**alpha)")
    group.add_argument("--eaft-conflict-entropy", type=float, default=0.15,
                       help="logging: a token is confident when min(H/ln top_k, 1) is below this")
    group.add_argument("--eaft-conflict-prob", type=float, default=0.15,
                       help="logging: ... and a conflict when p(label) is below this")
    group.add_argument("--no-eaft-stats", action="store_true",
                       help="do not compute gate weight / entropy / conflict statistics")
    group.add_argument("--eaft-fused-linear", action="store_true",
                       help="fuse the output layer into the loss (Megatron-Core's "
                            "output_processor hook): the logits are never materialised")
    return parser
