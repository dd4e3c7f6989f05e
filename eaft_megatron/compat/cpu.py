"""Run megatron-core on CPU with gloo: the smallest set of patches, in one place.

Usage (in every rank, after ``torch.distributed.init_process_group("gloo")``)::

    from eaft_megatron.compat import cpu_transformer_config_kwargs, install_cpu_compat

    install_cpu_compat()  # False (and nothing patched) when CUDA is available
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(num_layers=2, ..., **cpu_transformer_config_kwargs())

Megatron-core assumes CUDA in a few central places; each patch below says where and why. The
patches are global (module attributes) except the device-rewriting ``TorchFunctionMode``, which,
like every torch function mode, is thread-local: install in the thread that builds and runs the
model. ``uninstall_cpu_compat()`` restores everything (for tests).

Megatron's CUDA RNG (``torch.cuda.manual_seed``, ``get_cuda_rng_tracker().fork()``) is routed to
the CPU default generator, so ``model_parallel_cuda_manual_seed(seed)`` also reseeds
``torch.default_generator`` with ``seed``, and dropout inside a tracker fork draws from the
tracker's state, as it does on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from . import lazy_compile
from .patching import patch, replace, unpatch

__all__ = [
    "CPU_DEVICE_ARCH_VERSION",
    "CPU_PRETRAIN_FLAGS",
    "cpu_compat",
    "cpu_compat_installed",
    "cpu_transformer_config_kwargs",
    "install_cpu_compat",
    "setup_cpu_training",
    "skip_helper_build",
    "uninstall_cpu_compat",
]

# Megatron-LM ``pretrain()`` flags for CPU. The fusion flags would each trigger a slow
# torch.compile (~22 s) or need apex / TransformerEngine kernels.
CPU_PRETRAIN_FLAGS: tuple[str, ...] = (
    "--distributed-backend", "gloo",
    "--use-cpu-initialization",
    "--transformer-impl", "local",
    "--attention-backend", "local",
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
    "--spec", "local",  # 0.19's validate_args requires it with --attention-backend local
)

# What ``get_device_arch_version`` answers on CPU. validate_args() asserts
# CUDA_DEVICE_MAX_CONNECTIONS=1 for TP>1 only when the arch is < 10; its >= 10 branches only
# add FSDP / GTP high-priority stream groups, which a CPU run does not use.
CPU_DEVICE_ARCH_VERSION = 10

_RNG_FORK_WARNING = "CPU RNG state changed within GPU RNG context"

# (owner, attribute name, original value) for every attribute we replaced, in patch order.
_saved: list[tuple[Any, str, Any]] = []
# The trainer's set-up (setup_cpu_training, skip_helper_build), also undone by uninstall.
_training_saved: list[tuple[Any, str, Any]] = []
_mode: TorchFunctionMode | None = None
_log_filter: logging.Filter | None = None


def cpu_transformer_config_kwargs() -> dict[str, Any]:
    """``TransformerConfig`` keyword arguments for CPU: CPU init, fp32, every CUDA fusion off.

    ``use_cpu_initialization`` builds each full weight from the CPU generator and splits it, so
    a TP=N model equals the TP=1 model built from the same seed.
    """
    from megatron.core.transformer.enums import AttnBackend

    return dict(
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,  # p2p buffers; required when PP > 1
        attention_backend=AttnBackend.local,
        gradient_accumulation_fusion=False,  # needs apex's fused wgrad kernel
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
    )


class _CpuEvent:
    """Stands in for ``torch.cuda.Event``: on CPU the work before it is already done."""

    def record(self, stream: Any = None) -> None: ...
    def wait(self, stream: Any = None) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True


class _CpuStream:
    """Stands in for ``torch.cuda.Stream``: CPU ops run in order, so every wait is a no-op.

    All CPU streams are the one stream (they compare equal): megatron's all-to-all MoE token
    dispatcher compares its device-to-host side stream with the current one to decide whether
    to ``record_stream`` its CPU copies, which a CPU tensor cannot do. ``record_event`` returns
    an event (the dispatcher later calls ``synchronize()`` on it).
    """

    def wait_stream(self, stream: Any) -> None: ...
    def wait_event(self, event: Any) -> None: ...
    def record_event(self, event: Any = None) -> _CpuEvent:
        return event if event is not None else _CpuEvent()
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _CpuStream)

    def __hash__(self) -> int:
        return hash(_CpuStream)


_CPU_STREAM = _CpuStream()


class _CpuStreamClass(_CpuStream):
    """Replaces the ``torch.cuda.Stream`` class: constructing one allocates nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an int is a CUDA ordinal


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU and lets ``Tensor.type()`` report CUDA type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:  # model.cuda(), buffers moved to "the GPU"
            return args[0].to("cpu")
        if func is torch.Tensor.type:
            if len(args) == 1 and not kwargs:  # optimizers check "torch.cuda.FloatTensor"
                name = func(*args)
                return name.replace("torch.", "torch.cuda.", 1) if args[0].is_cpu else name
            if len(args) == 2 and isinstance(args[1], str):  # .type("torch.cuda.HalfTensor")
                args = (args[0], args[1].replace("torch.cuda.", "torch.", 1))
        if _is_cuda(kwargs.get("device")):  # torch.empty(..., device="cuda") in the schedules
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and any(_is_cuda(a) for a in args[1:]):  # t.to("cuda")
            args = (args[0], *("cpu" if _is_cuda(a) else a for a in args[1:]))
        return func(*args, **kwargs)


class _DropRngForkWarning(logging.Filter):
    """The tracker fork warns when the CPU RNG moves inside a fork; with CUDA RNG routed to the
    CPU generator that is exactly what dropout in a fork does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_FORK_WARNING not in record.getMessage()


def _patch(owner: Any, name: str, new: Any) -> None:
    """One CPU patch, through the project's patcher (:mod:`.patching`), undone by uninstall."""
    if callable(new):
        with contextlib.suppress(AttributeError, TypeError):
            new._eaft_cpu_compat = True
    replace(owner, name, new, _saved)


def _seed_cpu(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _no_compile_helpers() -> None:
    from megatron.core.datasets import helpers_cpp  # noqa: F401 - fail here if the wheel lacks it


def _cpu_arch_version() -> int:
    return CPU_DEVICE_ARCH_VERSION


def run_device() -> torch.device:
    """Where this process computes and runs megatron's collectives: its current CUDA device,
    else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def _current_device() -> torch.device:
    return torch.device("cpu")


def _synchronize(device: Any = None) -> None:
    return None


def _current_stream(device: Any = None) -> _CpuStream:
    return _CPU_STREAM


def _get_cpu_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state_torch(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _move_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    # megatron's version converts only CUDA tensors; on CPU the split sizes would stay tensors,
    # which gloo's all_to_all_single refuses (it takes sequences of ints).
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def install_cpu_compat() -> bool:
    """Patch torch.cuda and megatron-core so megatron runs on CPU; idempotent.

    Returns False, patching nothing, when ``torch.cuda.is_available()``; True once installed.
    """
    global _mode, _log_filter
    if torch.cuda.is_available():
        return False
    if _saved:
        return True
    import megatron.core.datasets.utils as datasets_utils
    import megatron.core.ssm.gated_delta_net.common as gdn_common
    import megatron.core.ssm.gated_delta_net.gdn as gdn
    import megatron.core.tensor_parallel.random as mcore_random
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher
    import megatron.training.arguments as training_arguments
    import megatron.training.utils as training_utils
    import megatron.training.utils.common_utils as training_common_utils

    try:
        # Rotary embeddings, TP mappings, grad buffers, p2p, ... use it as a device.
        _patch(torch.cuda, "current_device", _current_device)
        # p2p_communication (after batch_isend_irecv), timers, DDP: nothing to wait for on CPU.
        _patch(torch.cuda, "synchronize", _synchronize)
        # param_and_grad_buffer.start_grad_sync/finish_grad_sync wait on the current stream.
        _patch(torch.cuda, "current_stream", _current_stream)
        # get_model (0.19) builds DDP inside ``torch.cuda.stream(torch.cuda.Stream())``.
        _patch(torch.cuda, "Stream", _CpuStreamClass)
        # CUDA RNG -> CPU generator: model_parallel_cuda_manual_seed, CudaRNGStatesTracker.add,
        # checkpointing's rng state; torch.cuda.random holds separate bindings of the same names.
        for owner in (torch.cuda, torch.cuda.random):
            _patch(owner, "get_rng_state", _get_cpu_rng_state)
            _patch(owner, "set_rng_state", _set_cpu_rng_state_torch)
            _patch(owner, "manual_seed", _seed_cpu)
        # CudaRNGStatesTracker.fork/add restore states through it; without CUDA its _lazy_call
        # queues the callback forever, so the state silently never changes.
        _patch(mcore_random, "_set_cuda_rng_state", _set_cpu_rng_state)
        # The all-to-all MoE token dispatcher moves its split sizes "to the host" as numpy
        # arrays (only CUDA tensors are moved); here they already are on the host.
        for owner in (moe_utils, token_dispatcher):
            _patch(owner, "maybe_move_tensor_to_cpu", _move_to_host)
        # The gated DeltaNet (megatron.core.ssm.gated_delta_net) refuses to build without fla
        # (flash-linear-attention: Triton, CUDA only) and calls its causal_conv1d, l2norm and
        # chunk_gated_delta_rule (gdn.py imported two by name, common.py holds l2norm).
        # compat/deltanet.py computes the same in plain PyTorch (the delta rule by megatron's
        # own torch_chunk_gated_delta_rule), restarting at packed-document boundaries as fla.
        # jit_fuser (torch.compile) on three of its helpers would compile each with inductor on
        # CPU (a C++ toolchain, ~20 s per process): they run eagerly.
        if not gdn_common.HAVE_FLA:
            from . import deltanet

            _patch(gdn_common, "HAVE_FLA", True)
            _patch(gdn_common, "l2norm", deltanet.l2norm)
            _patch(gdn, "causal_conv1d", deltanet.causal_conv1d)
            _patch(gdn, "chunk_gated_delta_rule", deltanet.chunk_gated_delta_rule)
            for name in ("_apply_gated_norm", "_prepare_input_for_gated_delta_rule",
                         "_compute_g_and_beta"):
                _patch(gdn_common._GDNBase, name,
                       deltanet.eager(getattr(gdn_common._GDNBase, name)))
        # megatron's other jit_fuser helpers that run on CPU (the MoE router's expert-bias
        # update, the gated attention output): uncompiled, where the entry point deferred
        # torch.compile (compat/lazy_compile: ~1 CPU s per helper per process otherwise).
        _patch(lazy_compile, "EAGER", True)
        # initialize._compile_dependencies runs `make` on a Makefile the wheel lacks, then exits;
        # the wheel already ships the built helpers_cpp extension.
        _patch(datasets_utils, "compile_helpers", _no_compile_helpers)
        # arguments.validate_args queries CUDA device properties when TP > 1; the function is
        # imported by name into these modules.
        for owner in (training_common_utils, training_utils, training_arguments):
            _patch(owner, "get_device_arch_version", _cpu_arch_version)
        # device="cuda" in the pipeline schedules, Tensor.cuda() in get_model, the optimizers'
        # Tensor.type() == "torch.cuda.FloatTensor" checks.
        _mode = _CudaToCpuMode()
        _mode.__enter__()
        _log_filter = _DropRngForkWarning()
        logging.getLogger(mcore_random.__name__).addFilter(_log_filter)
    except BaseException:
        uninstall_cpu_compat()
        raise
    return True


def uninstall_cpu_compat() -> bool:
    """Undo :func:`install_cpu_compat`; idempotent. Returns True if something was restored."""
    global _mode, _log_filter
    restored = bool(_saved) or _mode is not None
    if _mode is not None:
        stack = torch.overrides._get_current_function_mode_stack()
        if not stack or stack[-1] is not _mode:
            raise RuntimeError(
                f"cpu compat mode is not the innermost torch function mode (stack: {stack}); "
                "exit modes entered after install_cpu_compat() first"
            )
        _mode.__exit__(None, None, None)
        _mode = None
    if _log_filter is not None:
        logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_log_filter)
        _log_filter = None
    restored = restored or bool(_training_saved)
    unpatch(_training_saved)
    unpatch(_saved)
    return restored


def skip_helper_build() -> None:
    """``pretrain()`` runs ``make`` to build megatron-core's dataset helpers, on a Makefile the
    pip wheel lacks (exit 1); the wheel ships the built ``helpers_cpp``: skip the build when it
    imports (:func:`install_cpu_compat` does the same on CPU; this is for GPU runs). Undone by
    :func:`uninstall_cpu_compat`."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return
    import megatron.core.datasets.utils as datasets_utils

    if not getattr(datasets_utils.compile_helpers, "_eaft_cpu_compat", False):
        replace(datasets_utils, "compile_helpers", _no_compile_helpers, _training_saved)


def setup_cpu_training(args: Any) -> None:
    """What Megatron-LM's initialisation skips without CUDA: gloo, model parallel, CUDA-RNG seeds
    (the trainer calls it after parsing, with Megatron's ``args``, on a machine without CUDA).

    ``initialize_megatron`` refuses to run without CUDA unless ``allow_no_cuda``; its
    ``_initialize_distributed`` only builds the model-parallel groups when a GPU is counted, and
    ``_set_random_seed`` only seeds the CUDA RNG tracker then. We build the groups first (the
    trainer passes ``skip_model_parallel_init``), and seed the tracker right after Megatron's own
    seeding (same seed rule: ``seed + 100 * pp_rank``), before any model is built. The wrapper of
    ``initialize_megatron`` is undone by :func:`uninstall_cpu_compat`.
    """
    from datetime import timedelta

    import megatron.training.training as loop
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", rank=args.rank, world_size=args.world_size,
            timeout=timedelta(minutes=args.distributed_timeout_minutes))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.virtual_pipeline_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,  # None: TP's
            order="tp-cp-ep-dp-pp" if not args.use_tp_pp_dp_mapping else "tp-cp-ep-pp-dp",
            create_gloo_process_groups=args.use_gloo_process_groups,
        )
    if getattr(loop.initialize_megatron, "_eaft_cpu_compat", False):
        return

    def wrap(original: Any) -> Any:
        def initialize_megatron(*a: Any, **kw: Any):
            kw["allow_no_cuda"] = True
            result = original(*a, **kw)
            seed = args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
            if args.data_parallel_random_init:
                seed += 10 * parallel_state.get_data_parallel_rank()
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
            return result

        initialize_megatron._eaft_cpu_compat = True
        return initialize_megatron

    patch(loop, "initialize_megatron", wrap, _training_saved)

    def skip_unused_warmup(original: Any) -> Any:
        # pretrain() warms up (torch.compiles) the bias-SwiGLU and bias-dropout-add fusions on
        # random tensors. The CPU flags switch both fusions off, so the compiled kernels never
        # run: the warm-up only costs ~1.5 CPU s per rank (~10 s more with a cold inductor
        # cache). Skipping it leaves the CPU generator where it was, so a run from random
        # weights (no --load) initialises differently than with the warm-up; checkpoints
        # loaded are unaffected.
        def set_jit_fusion_options(*a: Any, **kw: Any):
            if getattr(args, "bias_swiglu_fusion", False) or getattr(args, "bias_dropout_fusion",
                                                                      False):
                return original(*a, **kw)
            return None

        set_jit_fusion_options._eaft_cpu_compat = True
        return set_jit_fusion_options

    patch(loop, "set_jit_fusion_options", skip_unused_warmup, _training_saved)


def cpu_compat_installed() -> bool:
    """Whether :func:`install_cpu_compat` is in effect."""
    return bool(_saved)


@contextlib.contextmanager
def cpu_compat() -> Iterator[bool]:
    """``with cpu_compat() as installed:`` install for the block; restore only what it installed."""
    installed_here = not cpu_compat_installed() and install_cpu_compat()
    try:
        yield cpu_compat_installed()
    finally:
        if installed_here:
            uninstall_cpu_compat()
