"""Qwen3_5MoeForCausalLM and Qwen3_5MoeForConditionalGeneration (Qwen3.5-MoE, 35B-A3B to
397B-A17B): Qwen3.5's gated-DeltaNet / gated-attention hybrid (``qwen3_5.py``) with every MLP
a mixture of experts as Qwen2-MoE's: routed experts plus one always-on shared expert scaled by
a sigmoid gate (``shared_expert_gate`` [1, h] -> megatron ``moe_shared_expert_gate``).

Router: softmax over all experts, top-k (``num_experts_per_tok``), the k probabilities always
renormalised (the config has no ``norm_topk_prob``: megatron's softmax over the top-k logits,
``moe_router_pre_softmax=False``). ``save_pretrained`` writes the experts one tensor per expert
(``mlp.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``; transformers fuses them only in
memory), for the text and the vision-language checkpoints alike. The vision-language variant
keeps the language model under ``model.language_model.`` and carries the vision tower through,
as for dense Qwen3.5.
"""

from __future__ import annotations

import dataclasses

from .common import M
from .moe_common import DENSE_MLP, ROUTED_EXPERTS, ROUTER, shared_expert
from .qwen3_5 import QWEN3_5, language_model_of
from .spec import MoESpec, Rename


def _with_moe_mlp(mappings: tuple) -> tuple:
    """Qwen3.5's rows with its dense MLP rows replaced by the MoE rows (dense rows kept for
    layers a config might leave dense)."""
    out = []
    for m in mappings:
        if m.megatron == M + "mlp.linear_fc1.weight":
            out += [*DENSE_MLP, ROUTER, *ROUTED_EXPERTS, *shared_expert("shared_expert"),
                    Rename(M + "mlp.shared_experts.gate_weight",
                           "model.layers.{}.mlp.shared_expert_gate.weight", when="moe")]
        elif m.megatron != M + "mlp.linear_fc2.weight":
            out.append(m)
    return tuple(out)


QWEN3_5_MOE = dataclasses.replace(
    QWEN3_5,
    hf_architecture="Qwen3_5MoeForCausalLM",
    moe=MoESpec(score_function="softmax", shared_expert_gate=True, norm_topk_prob=True),
    mappings=_with_moe_mlp(QWEN3_5.mappings),
)

QWEN3_5_MOE_VL = language_model_of(QWEN3_5_MOE, "Qwen3_5MoeForConditionalGeneration")
