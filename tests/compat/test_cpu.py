"""The CPU compat layer: megatron-core GPT at TP=2 and PP=2 on gloo against a TP=1/PP=1 oracle.

    python -m pytest -q tests/compat

The oracle is the same model (local spec: RMSNorm, SwiGLU, GQA, rotary) built at TP=1/PP=1 in a
one-rank spawn. ``use_cpu_initialization`` draws each full weight from the CPU generator and
splits it, so TP=2 must reproduce the oracle's weights exactly and its logits and gradients up to
fp32 reduction order; the PP=2 stages load the oracle's weights and must reproduce its losses,
gradient norm and post-step losses through megatron's DDP, distributed optimizer and 1F1B schedule.
"""

from __future__ import annotations

import io
import logging
from functools import partial

import pytest
import torch

from eaft_megatron.compat import cpu

from tests.support.launch import spawn

SEED = 1234
VOCAB, SEQ, MICRO_BATCH, NUM_MICRO_BATCHES = 128, 16, 2, 2


# ---------------------------------------------------------------------------------------------
# helpers run inside the spawned ranks


def _pack(obj) -> bytes:
    """Tensors cross process boundaries as bytes: a queued tensor is shared through a file
    descriptor that dies with its (already exited) rank."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(NUM_MICRO_BATCHES):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
        loss_mask = torch.ones(MICRO_BATCH, SEQ)
        loss_mask[0, :3] = 0  # a masked prompt, so the mask is exercised
        out.append(dict(
            tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=loss_mask,
            position_ids=torch.arange(SEQ).expand(MICRO_BATCH, SEQ),
        ))
    return out


def _build_gpt(*, tie: bool):
    """A tiny Qwen2-architecture GPT (RMSNorm, SwiGLU, GQA, rotary, q/k/v bias) on the current
    parallel state, built as every model here is (``models.build_gpt_model``); seeds megatron's
    RNG first. (Not Qwen3: its q/k norm weights are replicated over TP and their gradients are
    per-rank partial sums until megatron's DDP reduces them, which this raw check bypasses.)"""
    import transformers
    from megatron.core import parallel_state, tensor_parallel

    from eaft_megatron.models import build_gpt_model

    tensor_parallel.model_parallel_cuda_manual_seed(SEED)  # also reseeds the CPU generator
    hf = transformers.Qwen2Config(
        architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
        max_position_embeddings=SEQ, tie_word_embeddings=tie)
    return build_gpt_model(
        hf, padded_vocab=VOCAB, transformer_impl="local",
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        **cpu.cpu_transformer_config_kwargs())


def _gather_tp(t: torch.Tensor, *, dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of megatron's CPU-init split: rank r holds chunks r, r + tp, ... (``stride``)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    world = torch.distributed.get_world_size(group)
    if world == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.detach().contiguous(), group=group)
    chunks = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([chunks[r][j] for j in range(stride) for r in range(world)], dim=dim)


def _full(param: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if getattr(param, "tensor_model_parallel", False):
        return _gather_tp(t, dim=param.partition_dim, stride=param.partition_stride)
    return t.detach().clone()


def _tp_forward_backward(rank, world_size):
    """Install, build at TP=world_size, forward + backward; return full weights/grads/logits."""
    from megatron.core import parallel_state, tensor_parallel

    assert cpu.install_cpu_compat() is True
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    model = _build_gpt(tie=True)
    # Megatron's CUDA RNG tracker on the CPU generator: a fork draws from the TP-rank's stream
    # and restores the default stream, without the "RNG changed inside fork" warning.
    records = []
    rng_logger = logging.getLogger(tensor_parallel.random.__name__)
    handler = logging.Handler()
    handler.emit = records.append
    rng_logger.addHandler(handler)
    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        rng = dict(fork=torch.rand(4))
    assert torch.equal(torch.get_rng_state(), before), "fork did not restore the CPU RNG"
    rng["default"] = torch.rand(4)
    rng_logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
    batch = _batches()[0]
    logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, vocab / tp]
    full_logits = _gather_tp(logits, dim=-1)
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits, batch["labels"])  # [b, s]
    (loss * batch["loss_mask"]).sum().backward()
    params = dict(model.named_parameters())
    out = dict(
        logits=full_logits, loss=loss.detach(), rng=rng,
        weights={n: _full(p, p) for n, p in params.items()},
        grads={n: _full(p, p.grad) for n, p in params.items()},
    )
    parallel_state.destroy_model_parallel()
    return _pack(out)


def _pp_train(rank, world_size, state_dict: bytes | None = None):
    """Two iterations of DDP + distributed Adam through megatron's schedule at PP=world_size.

    Loads ``state_dict`` (a packed PP=1 model's) into this stage when given; returns the
    stage's state dict (PP=1 only), per-micro-batch losses of both iterations and the grad norm.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    assert cpu.install_cpu_compat() is True
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world_size)
    model = _build_gpt(tie=False)
    initial = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    if state_dict is not None:
        state_dict = _unpack(state_dict)
        local = dict(initial)
        for i, layer in enumerate(model.decoder.layers):  # local index -> global layer number
            for k in initial:
                if k.startswith(f"decoder.layers.{i}."):
                    rest = k[len(f"decoder.layers.{i}."):]
                    local[k] = state_dict[f"decoder.layers.{layer.layer_number - 1}.{rest}"]
        for k in initial:
            if not k.startswith("decoder.layers."):
                local[k] = state_dict[k]
        model.load_state_dict(local, strict=True)

    config = model.config
    ddp = DistributedDataParallel(
        config=config, module=model,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                 grad_reduce_in_fp32=True),
    )
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0, use_distributed_optimizer=True),
        [ddp],
    )

    def loss_func(loss_mask, per_token_loss):
        loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum()
        return loss, {"lm loss": loss.clone().detach()}  # the schedule scales `loss` in place

    def forward_step(data_iterator, model_chunk):
        b = next(data_iterator)
        out = model_chunk(b["tokens"], b["position_ids"], None, labels=b["labels"])
        return out, partial(loss_func, b["loss_mask"])

    losses, grad_norm = [], None
    for step in range(2):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(_batches()), model=[ddp],
            num_microbatches=NUM_MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        losses.append([r["lm loss"] for r in reduced])  # empty list on non-last stages
        if step == 0:
            ok, grad_norm, _ = optimizer.step()
            assert ok
    out = dict(losses=losses, grad_norm=float(grad_norm),
               state_dict=initial if state_dict is None else None,
               last_stage=parallel_state.is_pipeline_last_stage())
    parallel_state.destroy_model_parallel()
    return _pack(out)


def _reference(rank, world_size):
    assert world_size == 1
    tp = _tp_forward_backward(rank, world_size)
    pp = _pp_train(rank, world_size)
    return dict(tp=tp, pp=pp)  # both packed


# ---------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def reference():
    return {k: _unpack(v) for k, v in spawn(_reference, 1)[0].items()}


def test_tensor_parallel_2_matches_tp1(reference):
    ref = reference["tp"]
    for rank, got in enumerate(map(_unpack, spawn(_tp_forward_backward, 2))):
        assert got["weights"].keys() == ref["weights"].keys()
        for name, w in ref["weights"].items():  # same seed, CPU init: identical weights
            assert torch.equal(got["weights"][name], w), f"rank {rank} weight {name}"
        torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"rank {rank} logits: {m}")
        torch.testing.assert_close(got["loss"], ref["loss"], atol=1e-5, rtol=1e-5)
        # Default stream: same seed on every TP rank; tracker stream: seed + 2718 + tp_rank.
        assert torch.equal(got["rng"]["default"], ref["rng"]["default"])
        assert torch.equal(got["rng"]["fork"], ref["rng"]["fork"]) == (rank == 0)
        for name, g in ref["grads"].items():
            assert g.abs().max() > 0, name
            torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"rank {rank} grad {name}: {m}")


def test_pipeline_parallel_2_matches_pp1(reference):
    ref = reference["pp"]
    results = [_unpack(r) for r in spawn(_pp_train, 2, _pack(ref["state_dict"]))]
    assert [r["last_stage"] for r in results] == [False, True]
    got = results[1]
    for step in range(2):
        assert len(got["losses"][step]) == NUM_MICRO_BATCHES
        for mb, (a, b) in enumerate(zip(got["losses"][step], ref["losses"][step])):
            assert torch.isfinite(a), f"step {step} micro-batch {mb}"
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"step {step} micro-batch {mb}: {m}")
    # The step changed the model (so step 2 checks the optimizer), and the clipped norm is global.
    assert not torch.equal(got["losses"][1][0], got["losses"][0][0])
    for r in results:
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)


def test_install_uninstall_is_idempotent_and_restores(monkeypatch):
    # From the state without the layer, whatever ran before in this process (an in-process
    # demo or trainer may have installed it); put back as found.
    if cpu.cpu_compat_installed():
        assert cpu.uninstall_cpu_compat() is True
        try:
            _install_uninstall_is_idempotent_and_restores(monkeypatch)
        finally:
            cpu.install_cpu_compat()
    else:
        _install_uninstall_is_idempotent_and_restores(monkeypatch)


def _install_uninstall_is_idempotent_and_restores(monkeypatch):
    import megatron.core.datasets.utils as datasets_utils
    import megatron.core.tensor_parallel.random as mcore_random
    import megatron.training.arguments as training_arguments

    targets = [
        (torch.cuda, "current_device"), (torch.cuda, "synchronize"),
        (torch.cuda, "current_stream"), (torch.cuda, "get_rng_state"),
        (torch.cuda, "set_rng_state"), (torch.cuda, "manual_seed"),
        (torch.cuda.random, "get_rng_state"), (torch.cuda.random, "manual_seed"),
        (mcore_random, "_set_cuda_rng_state"), (datasets_utils, "compile_helpers"),
        (training_arguments, "get_device_arch_version"),
    ]
    before = {(id(o), n): getattr(o, n) for o, n in targets}
    modes_before = len(torch.overrides._get_current_function_mode_stack())
    try:
        assert cpu.install_cpu_compat() is True
        assert cpu.install_cpu_compat() is True  # idempotent: patched once, one mode pushed
        assert cpu.cpu_compat_installed()
        assert len(torch.overrides._get_current_function_mode_stack()) == modes_before + 1
        for o, n in targets:
            patched = getattr(o, n)
            assert patched is not before[(id(o), n)], n
            assert patched.__wrapped__ is before[(id(o), n)], n
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(1).cuda().device.type == "cpu"
        assert torch.ones(1).to("cuda:0").device.type == "cpu"
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        torch.cuda.manual_seed(5)
        a = torch.rand(3)
        torch.cuda.set_rng_state(torch.cuda.get_rng_state())
        torch.cuda.manual_seed(5)
        assert torch.equal(a, torch.rand(3))  # the CUDA RNG is the CPU generator
        torch.cuda.synchronize()
        torch.cuda.current_stream().wait_stream(torch.cuda.current_stream())
        datasets_utils.compile_helpers()
        assert training_arguments.get_device_arch_version() == cpu.CPU_DEVICE_ARCH_VERSION
    finally:
        assert cpu.uninstall_cpu_compat() is True
    assert cpu.uninstall_cpu_compat() is False
    assert not cpu.cpu_compat_installed()
    for o, n in targets:
        assert getattr(o, n) is before[(id(o), n)], n
    assert len(torch.overrides._get_current_function_mode_stack()) == modes_before
    assert torch.zeros(1).type() == "torch.FloatTensor"

    with cpu.cpu_compat() as installed:
        assert installed and torch.zeros(1, device="cuda").device.type == "cpu"
    assert not cpu.cpu_compat_installed()

    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert cpu.install_cpu_compat() is False
        assert not cpu.cpu_compat_installed()
        for o, n in targets:
            assert getattr(o, n) is before[(id(o), n)], n
        assert len(torch.overrides._get_current_function_mode_stack()) == modes_before


def test_moe_dispatcher_stand_ins():
    """The all-to-all MoE dispatcher's CPU needs: streams compare equal (no record_stream of a
    CPU tensor), record_event returns something to synchronize, split sizes become host arrays
    (gloo's all_to_all_single takes int sequences). End to end: tests/models/test_moe.py."""
    import numpy as np

    from eaft_megatron.compat import cpu_compat

    with cpu_compat() as installed:
        if not installed:
            pytest.skip("CUDA present: nothing is patched")
        import megatron.core.transformer.moe.token_dispatcher as td

        side = torch.cuda.Stream()
        assert torch.cuda.current_stream() == side
        side.record_event().synchronize()
        sizes = td.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
        assert isinstance(sizes, np.ndarray) and sizes.tolist() == [3, 1]
        kept = torch.tensor([2])
        assert td.maybe_move_tensor_to_cpu(kept) is kept
