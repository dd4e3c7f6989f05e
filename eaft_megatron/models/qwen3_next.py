"""Qwen3NextForCausalLM (Qwen3-Next-80B-A3B): the architecture Qwen3.5-MoE grew from
(``qwen3_5_moe.py``): gated-DeltaNet and gated-attention layers after ``layer_types``,
zero-centred norms, routed experts plus a sigmoid-gated shared expert.

Differences from Qwen3.5-MoE: the DeltaNet's input projections are fused and grouped by key
head (``in_proj_qkvz``: per key head ``[q; k; v; z]``, ``in_proj_ba``: per key head
``[b; a]``), regrouped into megatron's ``in_proj`` by :class:`~.spec.DeltaNetGroupedInProj`
(the convolution weight stays as is: both sides convolve ``[q; k; v]`` over all heads); the
router reads ``norm_topk_prob``; ``mlp_only_layers`` / ``decoder_sparse_step`` may leave layers
dense (as Qwen2/3-MoE, ``moe_layer_freq`` list).
"""

from __future__ import annotations

import dataclasses

from .common import H, M
from .qwen3_5_moe import QWEN3_5_MOE
from .spec import DeltaNetGroupedInProj, MoESpec


def _grouped_in_proj(mappings: tuple) -> tuple:
    fused = DeltaNetGroupedInProj(M + "self_attention.in_proj.weight",
                                  qkvz=H + "linear_attn.in_proj_qkvz.weight",
                                  ba=H + "linear_attn.in_proj_ba.weight", when="linear")
    return tuple(fused if m.megatron == fused.megatron else m for m in mappings)


QWEN3_NEXT = dataclasses.replace(
    QWEN3_5_MOE,
    hf_architecture="Qwen3NextForCausalLM",
    moe=MoESpec(score_function="softmax", shared_expert_gate=True),
    mappings=_grouped_in_proj(QWEN3_5_MOE.mappings),
)
