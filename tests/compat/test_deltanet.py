"""The CPU layer's plain-PyTorch stand-ins for fla's gated-DeltaNet kernels
(``eaft_megatron/compat/deltanet.py``) against transformers' own reference functions, and their
installation into megatron-core (undone by ``uninstall_cpu_compat``). No process group.

    python -m pytest -q tests/compat/test_deltanet.py
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

from eaft_megatron.compat import deltanet

GEN = torch.Generator().manual_seed(0)


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def test_causal_conv1d_matches_transformers():
    x, w = _rand(2, 70, 12), _rand(12, 4) / 2  # [b, s, channels], [channels, window]
    y, state = deltanet.causal_conv1d(x, w, activation="silu")
    ref = hf.causal_conv1d_fn(x.transpose(1, 2), w, None, activation="silu").transpose(1, 2)
    assert state is None and torch.allclose(y, ref, atol=1e-6)


def _gdn_inputs(b: int, s: int, h: int = 3, dk: int = 8, dv: int = 5):
    q, k = deltanet.l2norm(_rand(b, s, h, dk)), deltanet.l2norm(_rand(b, s, h, dk))
    v = _rand(b, s, h, dv)
    g = -torch.rand(b, s, h, generator=GEN) * 0.1  # log decay <= 0, slow
    beta = torch.rand(b, s, h, generator=GEN)
    return q, k, v, g, beta


def test_chunk_gated_delta_rule_matches_transformers_across_chunks():
    q, k, v, g, beta = _gdn_inputs(2, 150)  # three 64-token chunks, the last partial
    out, state = deltanet.chunk_gated_delta_rule(q, k, v, g=g, beta=beta)
    ref, _ = hf.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta)
    assert state is None and torch.allclose(out, ref, atol=1e-5)
    # and the kernel's own l2norm option equals normalising first
    raw = (_rand(1, 20, 3, 8), _rand(1, 20, 3, 8))
    a, _ = deltanet.chunk_gated_delta_rule(*raw, v[:1, :20], g=g[:1, :20], beta=beta[:1, :20],
                                           use_qk_l2norm_in_kernel=True)
    b, _ = deltanet.chunk_gated_delta_rule(*(deltanet.l2norm(t) for t in raw), v[:1, :20],
                                           g=g[:1, :20], beta=beta[:1, :20])
    assert torch.equal(a, b)


def test_packed_documents_start_from_zero_state():
    """With cu_seqlens (batch 1) both kernels treat every document as a sequence of its own."""
    q, k, v, g, beta = _gdn_inputs(1, 100)
    x, w = _rand(1, 100, 12), _rand(12, 4)
    cu = torch.tensor([0, 37, 37, 100], dtype=torch.int32)  # an empty document included
    out, _ = deltanet.chunk_gated_delta_rule(q, k, v, g=g, beta=beta, cu_seqlens=cu)
    conv, _ = deltanet.causal_conv1d(x, w, activation="silu", cu_seqlens=cu)
    for a, b in ((0, 37), (37, 100)):
        alone, _ = hf.torch_chunk_gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b],
                                                   g=g[:, a:b], beta=beta[:, a:b])
        assert torch.allclose(out[:, a:b], alone, atol=1e-5)
        conv_alone, _ = deltanet.causal_conv1d(x[:, a:b], w, activation="silu")
        assert torch.allclose(conv[:, a:b], conv_alone, atol=1e-6)
    with pytest.raises(ValueError, match="does not cover the 100 packed tokens"):
        deltanet.causal_conv1d(x, w, cu_seqlens=torch.tensor([0, 50]))


def test_inference_state_is_refused():
    q, k, v, g, beta = _gdn_inputs(1, 4)
    with pytest.raises(NotImplementedError, match="no recurrent state"):
        deltanet.chunk_gated_delta_rule(q, k, v, g=g, beta=beta, output_final_state=True)
    with pytest.raises(NotImplementedError, match="no convolution state"):
        deltanet.causal_conv1d(_rand(1, 4, 12), _rand(12, 4), output_final_state=True)


def test_installed_into_megatron_and_undone():
    import megatron.core.ssm.gated_delta_net.common as common
    import megatron.core.ssm.gated_delta_net.gdn as gdn

    from eaft_megatron.compat import cpu_compat, cpu_compat_installed

    if cpu_compat_installed():
        pytest.skip("the CPU layer is already installed in this process")
    if common.HAVE_FLA:
        pytest.skip("fla is installed: megatron's own kernels run, nothing is patched")
    before = (common.l2norm, gdn.causal_conv1d, gdn.chunk_gated_delta_rule,
              common._GDNBase.__dict__["_compute_g_and_beta"])
    with cpu_compat() as installed:
        if not installed:
            pytest.skip("CUDA is available: the CPU layer patches nothing")
        assert common.HAVE_FLA
        assert gdn.causal_conv1d is deltanet.causal_conv1d
        assert gdn.chunk_gated_delta_rule is deltanet.chunk_gated_delta_rule
        assert common.l2norm is deltanet.l2norm
    assert not common.HAVE_FLA
    assert (common.l2norm, gdn.causal_conv1d, gdn.chunk_gated_delta_rule,
            common._GDNBase.__dict__["_compute_g_and_beta"]) == before
