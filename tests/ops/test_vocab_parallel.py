"""vocab_parallel_eaft_cross_entropy against the float64 single-device oracle, at tp=1/2/4."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eaft_megatron import EAFTTokenStats, vocab_parallel_eaft_cross_entropy
from tests.support.launch import spawn
from tests.ops.reference import make_case, reference_eaft

LOSS_TYPES = ("sft", "dft", "eaft")
ENTROPIES = ("topk", "full")
# (dtype, loss/stat tolerance, gradient tolerance): the op computes in fp32 on the rounded
# input; the oracle computes in float64 on the same rounded values.
DTYPES = {
    "fp32": (torch.float32, 2e-5, 2e-6),
    "bf16": (torch.bfloat16, 2e-5, 4e-3),
}


def _check_against_reference(
    logits_full, target, *, rank, world, group, dtype_name, loss_type, entropy, top_k=20,
    alpha=1.0, shape=None, chunk_rows=None,
):
    """Run the op on this rank's shard and compare loss, stats and this rank's gradient slice."""
    dtype, tol, grad_tol = DTYPES[dtype_name]
    x = logits_full.to(dtype)
    n, vocab = x.shape
    vl = vocab // world
    shape = shape or (n,)
    gen = torch.Generator().manual_seed(n * 7 + vocab)
    grad_out = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5

    z = x.to(torch.float64).requires_grad_()
    ref_loss, ref_p, ref_h, ref_w = reference_eaft(
        z, target, loss_type=loss_type, top_k=top_k, alpha=alpha, entropy=entropy
    )
    (ref_loss * grad_out).sum().backward()
    ref_grad = z.grad[:, rank * vl : (rank + 1) * vl]

    shard = x[:, rank * vl : (rank + 1) * vl].clone().reshape(*shape, vl).requires_grad_()
    before = shard.detach().clone()
    loss, stats = vocab_parallel_eaft_cross_entropy(
        shard, target.reshape(shape), loss_type=loss_type, top_k=top_k, alpha=alpha,
        entropy=entropy, tp_group=group, return_stats=True, chunk_rows=chunk_rows,
    )
    (loss * grad_out.to(torch.float32).reshape(shape)).sum().backward()
    what = f"{loss_type}/{entropy}/{dtype_name}/tp{world}/rank{rank}/k{top_k}/a{alpha}"
    assert loss.dtype == torch.float32 and loss.shape == tuple(shape), what
    assert shard.grad.dtype == dtype and shard.grad.shape == shard.shape, what
    assert torch.equal(shard.detach(), before), f"{what}: input logits were modified"
    torch.testing.assert_close(loss.reshape(-1).double(), ref_loss.detach(), atol=tol, rtol=tol,
                               msg=lambda m: f"{what} loss: {m}")
    ignored = target == -100
    assert torch.all(loss.reshape(-1)[ignored] == 0), what
    assert isinstance(stats, EAFTTokenStats)
    torch.testing.assert_close(stats.weight.reshape(-1).double(), ref_w, atol=tol, rtol=tol,
                               msg=lambda m: f"{what} weight: {m}")
    torch.testing.assert_close(stats.target_prob.reshape(-1).double(), ref_p, atol=tol, rtol=tol,
                               msg=lambda m: f"{what} target_prob: {m}")
    torch.testing.assert_close(stats.entropy.reshape(-1).double(), ref_h, atol=1e-4, rtol=1e-4,
                               msg=lambda m: f"{what} entropy: {m}")
    assert torch.equal(stats.mask.reshape(-1), ~ignored)
    # the model's most likely token over the whole vocabulary, from the same all-gather
    ref_top = torch.where(ignored, -1, torch.argmax(x, dim=1))
    assert stats.top_token.dtype == torch.int64, what
    assert torch.equal(stats.top_token.reshape(-1), ref_top), f"{what}: top_token"
    ref_ce = torch.where(ignored, 0.0, -torch.log(ref_p))
    torch.testing.assert_close(stats.cross_entropy.reshape(-1).double(), ref_ce, atol=tol * 10,
                               rtol=tol, msg=lambda m: f"{what} cross_entropy: {m}")
    torch.testing.assert_close(
        shard.grad.reshape(n, vl).double(), ref_grad, atol=grad_tol, rtol=grad_tol * 4,
        msg=lambda m: f"{what} grad: {m}",
    )


# ---------------------------------------------------------------------------------------------
# tp = 1, in process


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("entropy", ENTROPIES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_tp1_matches_reference(loss_type, entropy, dtype_name):
    logits, target = make_case(0, 40, 96)
    _check_against_reference(
        logits, target, rank=0, world=1, group=None, dtype_name=dtype_name,
        loss_type=loss_type, entropy=entropy, shape=(8, 5), chunk_rows=3,
    )


@pytest.mark.parametrize("top_k,alpha", [(5, 0.5), (20, 2.0), (64, 1.0)])
def test_tp1_gate_options(top_k, alpha):
    """Other k / alpha, and top_k equal to the whole vocabulary (one larger is refused:
    ``test_bad_input_errors``)."""
    logits, target = make_case(1, 33, 64)
    for entropy in ENTROPIES:
        _check_against_reference(
            logits, target, rank=0, world=1, group=None, dtype_name="fp32",
            loss_type="eaft", entropy=entropy, top_k=top_k, alpha=alpha,
        )


def test_fp16_input():
    logits, target = make_case(2, 16, 64, scale=2.0)
    x = logits.half().requires_grad_()
    loss = vocab_parallel_eaft_cross_entropy(x, target)
    loss.sum().backward()
    ref, *_ = reference_eaft(logits.half().double(), target)
    torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)
    assert x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all()


def test_confident_conflict_is_damped():
    """The point of EAFT: a confident wrong prediction gets a small weight, an uncertain one ~1."""
    vocab = 50
    logits = torch.zeros(2, vocab)
    logits[0, 3] = 30.0  # sure of token 3
    target = torch.tensor([7, 7])  # label 7: a confident conflict in row 0, uncertain row 1
    loss, stats = vocab_parallel_eaft_cross_entropy(logits, target, return_stats=True)
    sft = vocab_parallel_eaft_cross_entropy(logits, target, loss_type="sft")
    assert stats.weight[0] < 1e-9 and sft[0] > 25
    assert stats.weight[1] == pytest.approx(1.0, abs=1e-6)  # uniform top-20: H = ln 20 exactly
    assert loss[1] == pytest.approx(math.log(vocab), rel=1e-6)


def test_input_not_mutated_and_fp32_grad_is_not_aliased():
    logits, target = make_case(3, 24, 80)
    x = logits.float().requires_grad_()
    before = x.detach().clone()
    loss = vocab_parallel_eaft_cross_entropy(x, target, entropy="full")
    assert torch.equal(x.detach(), before)
    loss.sum().backward()
    assert torch.equal(x.detach(), before)
    assert x.grad.data_ptr() != x.data_ptr()


def test_all_ignored_gives_zeros():
    x = torch.randn(4, 3, 32, requires_grad=True)
    target = torch.full((4, 3), -100)
    for loss_type in LOSS_TYPES:
        for entropy in ENTROPIES:
            x.grad = None
            loss, stats = vocab_parallel_eaft_cross_entropy(
                x, target, loss_type=loss_type, entropy=entropy, return_stats=True
            )
            loss.sum().backward()
            assert torch.equal(loss, torch.zeros(4, 3))
            assert torch.equal(x.grad, torch.zeros_like(x))
            assert not stats.mask.any() and torch.equal(stats.weight, torch.zeros(4, 3))


def test_custom_ignore_index_and_int32_target():
    logits, target = make_case(4, 20, 40, ignore_index=-1)
    ref, *_ = reference_eaft(logits, target, ignore_index=-1)
    out = vocab_parallel_eaft_cross_entropy(logits.float(), target.int(), ignore_index=-1)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_non_finite_logits_are_not_hidden():
    x = torch.randn(4, 30)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    target = torch.tensor([0, 1, 2, 3])
    for loss_type in LOSS_TYPES:
        for entropy in ENTROPIES:
            loss = vocab_parallel_eaft_cross_entropy(x, target, loss_type=loss_type,
                                                     entropy=entropy)
            assert torch.isfinite(loss[[0, 3]]).all(), (loss_type, entropy)
            assert not torch.isfinite(loss[1]) and not torch.isfinite(loss[2]), (loss_type, entropy)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(target=torch.zeros(4, 2, dtype=torch.long)), ValueError, r"target shape \(4, 2\)"),
        (dict(target=torch.zeros(4, 3)), TypeError, "integer"),
        (dict(target=torch.tensor([[0, 1, 16]] * 4)), ValueError, "token id 16 outside"),
        (dict(target=torch.tensor([[0, 1, -5]] * 4)), ValueError, "token id -5"),
        (dict(logits=torch.zeros(4, 3, 16, dtype=torch.long)), TypeError, "floating point"),
        (dict(top_k=0), ValueError, "top_k must be >= 1, got 0"),
        (dict(top_k=1), ValueError, "ln\\(top_k\\)"),
        (dict(top_k=2.5), TypeError, "top_k must be an int"),
        (dict(top_k=17), ValueError, r"top_k=17 is larger than the vocabulary \(16 ids\)"),
        (dict(top_k=17, entropy="full"), ValueError, "top_k=17 is larger than the vocabulary"),
        (dict(alpha=-0.5), ValueError, "alpha must be finite and >= 0, got -0.5"),
        (dict(loss_type="focal"), ValueError, "loss_type must be one of .*'focal'"),
        (dict(entropy="renyi"), ValueError, "entropy must be one of .*'renyi'"),
        (dict(chunk_rows=0), ValueError, "chunk_rows"),
    ],
)
def test_bad_input_errors(kwargs, exc, match):
    args = dict(logits=torch.zeros(4, 3, 16), target=torch.zeros(4, 3, dtype=torch.long),
                top_k=8)  # the default 20 exceeds this vocabulary of 16
    args.update(kwargs)
    logits, target = args.pop("logits"), args.pop("target")
    with pytest.raises(exc, match=match):
        vocab_parallel_eaft_cross_entropy(logits, target, **args)


def test_torch_compile_around_the_loss():
    """A compiled model calling the loss: a clean graph break, same numbers as eager."""
    torch._dynamo.reset()
    layer = torch.nn.Linear(8, 32)
    h = torch.randn(6, 8)
    target = torch.randint(0, 32, (6,))
    target[0] = -100

    def step(h, target):
        return vocab_parallel_eaft_cross_entropy(layer(h) * 2.0, target).sum()

    eager = step(h, target)
    eager.backward()
    g_eager = layer.weight.grad.clone()
    layer.weight.grad = None
    compiled = torch.compile(step, backend="aot_eager")(h, target)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(layer.weight.grad, g_eager)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    vocab=st.integers(2, 70),
    scale=st.floats(0.0, 30.0),
    top_k=st.integers(2, 40),
    alpha=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_properties(n, vocab, scale, top_k, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=gen) * scale
    target = torch.randint(0, vocab, (n,), generator=gen)
    ce = torch.nn.functional.cross_entropy(x.double(), target, reduction="none")
    sft = vocab_parallel_eaft_cross_entropy(x, target, loss_type="sft")
    torch.testing.assert_close(sft.double(), ce, atol=1e-4, rtol=1e-5)
    top_k = min(top_k, vocab)  # a larger one is refused (test_bad_input_errors)
    for entropy in ENTROPIES:
        loss, stats = vocab_parallel_eaft_cross_entropy(
            x, target, top_k=top_k, alpha=alpha, entropy=entropy, return_stats=True
        )
        assert ((stats.weight >= 0) & (stats.weight <= 1)).all()
        assert (stats.entropy >= -1e-6).all()
        if entropy == "topk":
            assert (stats.entropy <= math.log(min(top_k, vocab)) + 1e-5).all()
        torch.testing.assert_close(loss, stats.weight * sft, atol=1e-5, rtol=1e-5)
        flat = vocab_parallel_eaft_cross_entropy(x, target, top_k=top_k, alpha=0.0,
                                                 entropy=entropy)
        torch.testing.assert_close(flat, sft)  # alpha = 0: the gate is 1, EAFT is SFT
    dft, stats = vocab_parallel_eaft_cross_entropy(x, target, loss_type="dft", return_stats=True)
    torch.testing.assert_close(stats.target_prob.double(), torch.exp(-ce), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# tp = 2 and 4: real gloo groups; every rank checks its own gradient slice


def _tp_worker(rank, world, n_tokens, vocab):
    import torch.distributed as dist

    group = dist.group.WORLD
    logits, target = make_case(10 + world, n_tokens, vocab)
    for dtype_name in DTYPES:
        for loss_type in LOSS_TYPES:
            for entropy in ENTROPIES:
                _check_against_reference(
                    logits, target, rank=rank, world=world, group=group, dtype_name=dtype_name,
                    loss_type=loss_type, entropy=entropy, shape=(n_tokens // 2, 2), chunk_rows=5,
                )
    for top_k, alpha in ((3, 0.5), (vocab, 1.5)):  # k < V/tp, and k = V > V/tp
        _check_against_reference(
            logits, target, rank=rank, world=world, group=group, dtype_name="fp32",
            loss_type="eaft", entropy="topk", top_k=top_k, alpha=alpha,
        )
    return True


@pytest.mark.parametrize("world,vocab", [(2, 64), (4, 48)])  # tp=4: V/tp = 12 < top_k = 20
def test_tensor_parallel_matches_reference(world, vocab):
    assert spawn(_tp_worker, world, 26, vocab) == [True] * world


def _megatron_peer_worker(rank, world):
    """sft must equal megatron-core's own vocab_parallel_cross_entropy (loss and gradient),
    and tp_group=None must pick up megatron-core's TP group."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits, target = make_case(20, 24, 64, ignore_frac=0.0)
    vl = 64 // world
    shard = logits.float()[:, rank * vl : (rank + 1) * vl].reshape(6, 4, vl)
    tgt = target.reshape(6, 4)
    valid = tgt != -100  # megatron has no ignore_index: compare supervised tokens only
    assert (~valid).any()
    g = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) * valid

    ours_in = shard.clone().requires_grad_()
    ours = vocab_parallel_eaft_cross_entropy(ours_in, tgt, loss_type="sft",
                                             tp_group=dist.group.WORLD)
    (ours * g).sum().backward()
    theirs_in = shard.clone().requires_grad_()
    theirs = vocab_parallel_cross_entropy(theirs_in.clone(), tgt, tp_group=dist.group.WORLD)
    (theirs * g).sum().backward()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-6, rtol=1e-5)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        default = vocab_parallel_eaft_cross_entropy(shard, tgt)
        explicit = vocab_parallel_eaft_cross_entropy(shard, tgt, tp_group=dist.group.WORLD)
        assert torch.equal(default, explicit)
    finally:
        parallel_state.destroy_model_parallel()
    return True


def test_sft_equals_megatron_vocab_parallel_cross_entropy_tp2():
    assert spawn(_megatron_peer_worker, 2) == [True, True]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_only_one_logits_sized_buffer_survives_forward(dtype):
    n, vocab = 12, 64
    x = torch.randn(n, vocab, dtype=dtype, requires_grad=True)
    loss = vocab_parallel_eaft_cross_entropy(x, torch.randint(0, vocab, (n,)), chunk_rows=5)
    saved = loss.grad_fn.saved_tensors
    big = [t for t in saved if t.numel() >= n * vocab]
    assert len(big) == 1 and big[0].dtype == torch.float32, [(t.shape, t.dtype) for t in saved]
    assert all(t.numel() <= n for t in saved if t is not big[0])
    assert big[0].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------------
# edge cases: no tokens at all, and -inf logits (masked vocabulary entries)


def masked_case(seed: int, n_tokens: int, vocab: int, *, masked_tail: int):
    """``make_case`` with -inf logits: ~30% of entries at random, the last ``masked_tail``
    columns (masked vocabulary), and rows 0-2 keep only 4 finite logits (fewer than top_k);
    never a row's label nor column 0 (so every row keeps a finite logit)."""
    logits, target = make_case(seed, n_tokens, vocab)
    masked = torch.rand(n_tokens, vocab, generator=torch.Generator().manual_seed(seed)) < 0.3
    masked[:, vocab - masked_tail:] = True
    masked[:3, 4:] = True
    masked[:, 0] = False
    masked[torch.arange(n_tokens), target.clamp(min=0)] = False
    return logits.masked_fill(masked, float("-inf")), target, masked


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("entropy", ENTROPIES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_minus_inf_logits_have_zero_probability(loss_type, entropy, dtype_name):
    """A -inf logit has p = 0 and adds 0 to the entropy ((-inf) * 0 is not NaN here)."""
    logits, target, masked = masked_case(5, 30, 80, masked_tail=16)
    _check_against_reference(logits, target, rank=0, world=1, group=None,
                             dtype_name=dtype_name, loss_type=loss_type, entropy=entropy,
                             chunk_rows=7)
    x = logits.to(DTYPES[dtype_name][0]).requires_grad_()
    loss = vocab_parallel_eaft_cross_entropy(x, target, loss_type=loss_type, entropy=entropy)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert torch.all(x.grad[masked] == 0)


EMPTY_SHAPES = [(0,), (0, 3), (2, 0)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_no_tokens(shape):
    """N = 0: an empty loss (and stats) of the target's shape; backward gives an empty gradient
    of the logits' shape and dtype, in every mode, equal to the float64 oracle's."""
    for dtype in (torch.float32, torch.bfloat16):
        for loss_type in LOSS_TYPES:
            for entropy in ENTROPIES:
                x = torch.randn(*shape, 24).to(dtype).requires_grad_()
                target = torch.zeros(shape, dtype=torch.long)
                loss, stats = vocab_parallel_eaft_cross_entropy(
                    x, target, loss_type=loss_type, entropy=entropy, return_stats=True)
                ref = reference_eaft(x.detach().double().reshape(-1, 24), target.reshape(-1),
                                     loss_type=loss_type, entropy=entropy)[0]
                assert loss.shape == shape and loss.dtype == torch.float32 and ref.numel() == 0
                assert all(s.shape == shape for s in stats)
                (loss * 2.0).sum().backward()
                assert x.grad.shape == x.shape and x.grad.dtype == dtype
                plain = vocab_parallel_eaft_cross_entropy(x, target, loss_type=loss_type,
                                                          entropy=entropy, chunk_rows=1)
                assert plain.shape == shape


def _edge_cases_worker(rank, world):
    """tp=2: -inf logits (including rows whose whole shard on rank 1 is -inf: masked vocabulary
    padding), and N = 0 for both ops."""
    import torch.distributed as dist

    from eaft_megatron import fused_linear_eaft_cross_entropy

    group = dist.group.WORLD
    logits, target, _ = masked_case(6, 26, 64, masked_tail=32)  # rank 1: only labels finite
    assert (torch.isinf(logits[:, 32:]).all(dim=1)).any()
    for dtype_name in DTYPES:
        for loss_type in LOSS_TYPES:
            for entropy in ENTROPIES:
                _check_against_reference(logits, target, rank=rank, world=world, group=group,
                                         dtype_name=dtype_name, loss_type=loss_type,
                                         entropy=entropy, chunk_rows=5)
    for loss_type in LOSS_TYPES:
        for entropy in ENTROPIES:
            x = torch.randn(0, 2, 16, requires_grad=True)
            loss = vocab_parallel_eaft_cross_entropy(x, torch.zeros(0, 2, dtype=torch.long),
                                                     loss_type=loss_type, entropy=entropy,
                                                     tp_group=group)
            loss.sum().backward()
            assert loss.shape == (0, 2) and x.grad.shape == x.shape
            for sequence_parallel in (False, True):
                h = torch.randn(0, 2, 8, requires_grad=True)
                w = torch.randn(16, 8, requires_grad=True)
                loss = fused_linear_eaft_cross_entropy(
                    h, w, torch.zeros(0, 2, dtype=torch.long), loss_type=loss_type,
                    entropy=entropy, tp_group=group, sequence_parallel=sequence_parallel)
                loss.sum().backward()
                assert loss.shape == (0, 2) and h.grad.shape == h.shape
                assert torch.equal(w.grad, torch.zeros_like(w))
    return True


def test_tensor_parallel_edge_cases():
    assert spawn(_edge_cases_worker, 2) == [True, True]


def _top_token_ties_worker(rank, world):
    """Ties across ranks and within a shard: the lowest global id wins, as torch.argmax."""
    import torch.distributed as dist

    vocab = 8 * world
    logits = torch.zeros(5, vocab)
    logits[0, [3, vocab - 1]] = 2.0  # tie across the first and last rank
    logits[1, [vocab // 2 + 1, vocab // 2 + 2]] = 1.0  # tie inside one shard
    logits[2] = torch.arange(vocab, dtype=torch.float32)  # the last id
    logits[3, 0] = 5.0  # the first id
    target = torch.tensor([0, 1, 2, -100, 4])
    vl = vocab // world
    for fused_rows in (None, 2):
        _, stats = vocab_parallel_eaft_cross_entropy(
            logits[:, rank * vl:(rank + 1) * vl].clone(), target, tp_group=dist.group.WORLD,
            return_stats=True, chunk_rows=fused_rows, top_k=4)
        expected = torch.where(target == -100, -1, logits.argmax(dim=1))
        assert torch.equal(stats.top_token, expected), (stats.top_token, expected)
    return True


def test_top_token_ties_match_torch_argmax():
    assert spawn(_top_token_ties_worker, 2) == [True, True]
