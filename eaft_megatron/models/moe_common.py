"""Table rows shared by the mixture-of-experts decoders (Qwen2-MoE, Qwen3-MoE, GLM-4.5).

Megatron side: megatron-core's own ``MoELayer`` (``TopKRouter``, ``SequentialMLP`` experts, one
``linear_fc1`` = ``[gate; up]`` and ``linear_fc2`` per expert, ``SharedExpertMLP``). HF side:
the per-expert tensors as checkpoints store them (transformers >= 5 fuses the experts in memory
but ``save_pretrained`` writes them back per expert). ``{}`` {} = layer, expert.
"""

from __future__ import annotations

from .common import H, M
from .spec import GatedMLP, Rename

# The dense MLP of the layers that are not MoE ones (moe_layer_freq 0).
DENSE_MLP = (
    GatedMLP(M + "mlp.linear_fc1.weight", gate=H + "mlp.gate_proj.weight",
             up=H + "mlp.up_proj.weight", when="dense"),
    Rename(M + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight", when="dense"),
)

ROUTER = Rename(M + "mlp.router.weight", H + "mlp.gate.weight", when="moe")

ROUTED_EXPERTS = (
    GatedMLP(M + "mlp.experts.local_experts.{}.linear_fc1.weight",
             gate=H + "mlp.experts.{}.gate_proj.weight", up=H + "mlp.experts.{}.up_proj.weight",
             when="moe"),
    Rename(M + "mlp.experts.local_experts.{}.linear_fc2.weight",
           H + "mlp.experts.{}.down_proj.weight", when="moe"),
)


def shared_expert(hf_module: str) -> tuple:
    """The always-on shared expert (HF ``mlp.shared_expert`` in Qwen2-MoE,
    ``mlp.shared_experts`` in GLM-4.5) -> megatron's ``mlp.shared_experts``."""
    return (
        GatedMLP(M + "mlp.shared_experts.linear_fc1.weight",
                 gate=H + f"mlp.{hf_module}.gate_proj.weight",
                 up=H + f"mlp.{hf_module}.up_proj.weight", when="moe"),
        Rename(M + "mlp.shared_experts.linear_fc2.weight",
               H + f"mlp.{hf_module}.down_proj.weight", when="moe"),
    )
