"""Plain-PyTorch stand-ins for the three GPU kernels megatron-core's gated DeltaNet calls.

megatron-core 0.19's ``GatedDeltaNet`` (``megatron.core.ssm.gated_delta_net``) takes its
kernels from ``fla`` (flash-linear-attention: Triton, CUDA only) and refuses to build without
it. :func:`eaft_megatron.compat.cpu.install_cpu_compat` puts these in their place on CPU; on a
GPU megatron's own (fla) kernels run. Same signatures and results as fla's, training only (no
recurrent state in or out):

* :func:`causal_conv1d` -- ``fla.modules.convolution.causal_conv1d``: depthwise causal
  convolution of ``x`` [b, s, d] with ``weight`` [d, w], then SiLU;
* :func:`l2norm` -- ``fla.modules.l2norm.l2norm``: ``x / sqrt(sum(x^2) + eps)`` in fp32;
* :func:`chunk_gated_delta_rule` -- ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``, by
  megatron-core's own ``torch_chunk_gated_delta_rule`` (its deterministic-mode kernel).

Packed sequences: with ``cu_seqlens`` (batch 1, documents concatenated along the sequence)
both the convolution and the delta rule run document by document from a zero state, as fla's
varlen kernels do, so nothing of one document reaches the next.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d", "chunk_gated_delta_rule", "l2norm"]


def _segments(cu_seqlens: torch.Tensor | None, length: int) -> list[tuple[int, int]]:
    """[(start, end)] of every packed document (one segment without ``cu_seqlens``)."""
    if cu_seqlens is None:
        return [(0, length)]
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != length or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens {bounds} does not cover the {length} packed tokens")
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal convolution of x [b, s, d] by weight [d, w] -> [b, s, d]."""
    out = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1,
                   groups=weight.shape[0])
    return out[..., : x.shape[1]].transpose(1, 2)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, initial_state: Any = None,
                  output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """x [b, s, d], weight [d, w] -> (y [b, s, d], None); ``y_t`` sees ``x_{t-w+1..t}`` of its
    own document only."""
    if initial_state is not None or output_final_state:
        raise NotImplementedError("causal_conv1d stand-in: no convolution state (inference)")
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"causal_conv1d stand-in: activation {activation!r}")
    y = torch.cat([_conv(x[:, a:b], weight, bias) for a, b in _segments(cu_seqlens, x.shape[1])],
                  dim=1)
    return (F.silu(y) if activation else y), None


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6, **kwargs: Any) -> torch.Tensor:
    """``x / sqrt(sum(x^2, dim) + eps)``, computed in fp32, returned in ``x``'s dtype."""
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(dim=dim, keepdim=True) + eps)).to(x.dtype)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, scale: float | None = None,
                           initial_state: Any = None, output_final_state: bool = False,
                           use_qk_l2norm_in_kernel: bool = False,
                           cu_seqlens: torch.Tensor | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """q, k [b, s, h, d_k], v [b, s, h, d_v], g (log decay) and beta [b, s, h] ->
    (o [b, s, h, d_v], None), each document of ``cu_seqlens`` from a zero state."""
    from megatron.core.ssm.gated_delta_net import torch_chunk_gated_delta_rule

    if scale is not None and scale != q.shape[-1] ** -0.5:
        raise NotImplementedError("chunk_gated_delta_rule stand-in: only scale 1/sqrt(d_k)")
    if initial_state is not None or output_final_state:
        raise NotImplementedError("chunk_gated_delta_rule stand-in: no recurrent state in or "
                                  "out (inference)")
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    parts = [torch_chunk_gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b],
                                          beta[:, a:b])[0]
             for a, b in _segments(cu_seqlens, q.shape[1])]
    return torch.cat(parts, dim=1), None


def eager(method: Any) -> Any:
    """A plain function calling the one under a ``torch.compile`` wrapper (megatron's
    ``jit_fuser``), so that it runs eagerly."""
    function = getattr(method, "_torchdynamo_orig_callable", method)

    def run_eagerly(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    return run_eagerly
