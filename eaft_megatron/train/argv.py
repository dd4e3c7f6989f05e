"""Complete a Megatron-LM command line: architecture from the HF config, CPU flags, EAFT defaults.

The user types only what is not architecture; :func:`complete_argv` adds, unless already given:

- the architecture flags derived from the HF config (``--hf-config DIR``, else ``<load>/hf/``,
  as written by ``eaft-megatron convert hf-to-megatron`` and by this trainer's ``--save``);
  a value typed by the user that disagrees with the HF config is an error; for MoE models also
  the training settings that follow the model unless typed (:func:`moe_training_flags`: aux
  loss coefficient, all-to-all dispatcher, fp32 router); GLM's ``expert_bias`` update rate is
  megatron-core's default ``--moe-router-bias-update-rate`` 1e-3 (HF configs have no such field);
- ``--tokenizer-type NullTokenizer --vocab-size V`` (the data is already tokenized) and
  ``--seq-length`` from the prepared data's summary;
- where the run starts (:mod:`.restart`): ``--load SRC`` (+ ``--finetune``) resuming the latest
  complete checkpoint of ``--save`` when there is one, else the pretrained / converted model
  (weights only, iteration 0); ``--pretrained-checkpoint`` is resolved here, Megatron never sees
  it; a checkpoint named and missing is an error;
- checks that fail in one line before any heavy work: prepared data present and complete
  (``--data-path`` / ``--train-data-path`` / ``--valid-data-path``), tensor/pipeline sizes that
  divide heads, query groups and layers (and an expert-parallel size that divides the experts),
  EAFT flags, a pretrained checkpoint of another architecture than ``--hf-config``, resuming
  training at another expert-parallel size than the checkpoint's (megatron-core cannot load
  its optimizer state there; :func:`check_expert_parallel_resume`), training a MoE model at
  TP > 1 without ``--sequence-parallel`` (or at all on CPU; :func:`check_moe_tensor_parallel`);
- ``--calculate-per-token-loss`` (always: loss = sum of w*CE over the global batch / global
  number of supervised tokens), ``--train-iters 0`` for ``--skip-train`` / ``--eval-only``;
- on a machine without CUDA, ``eaft_megatron.compat.CPU_PRETRAIN_FLAGS`` (gloo, local spec,
  fusions off); on a GPU without transformer-engine, ``--transformer-impl local``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .restart import CheckpointError, Start, resolve_start

__all__ = ["LaunchInfo", "TrainArgError", "complete_argv", "drop_flag", "find_hf_dir", "flag_value",
           "flag_values"]


class TrainArgError(ValueError):
    """A command line that cannot describe a run (message says why)."""


@dataclass
class LaunchInfo:
    hf_dir: Path
    hf_config: Any
    cpu: bool
    added: list[str]
    start: Start


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` (``--flag V`` or ``--flag=V``; last one wins), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def flag_values(argv: list[str], flag: str) -> list[str] | None:
    """The values of a ``nargs='*'`` flag (up to the next ``--option``), or None if absent."""
    values = None
    for i, a in enumerate(argv):
        if a == flag:
            values = []
            for b in argv[i + 1:]:
                if b.startswith("--"):
                    break
                values.append(b)
        elif a.startswith(flag + "="):
            values = [a.split("=", 1)[1]]
    return values


def _has(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def drop_flag(argv: list[str], flag: str, *, takes_value: bool = True) -> list[str]:
    """``argv`` without any ``--flag [V]`` / ``--flag=V``."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = takes_value
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def find_hf_dir(argv: list[str], roots: tuple[str | None, ...] = ()) -> Path:
    """``--hf-config DIR``, else the ``hf/`` directory stored with the first checkpoint root
    that has one: ``roots`` (the resolved start), ``--load``, ``--pretrained-checkpoint``."""
    explicit = flag_value(argv, "--hf-config")
    if explicit is not None:
        path = Path(explicit)
        if not (path / "config.json").is_file():
            raise TrainArgError(f"--hf-config {path}: no config.json there")
        return path
    for root in (*roots, flag_value(argv, "--load"), flag_value(argv, "--pretrained-checkpoint")):
        if root is not None and (Path(root) / "hf" / "config.json").is_file():
            return Path(root) / "hf"
    raise TrainArgError("no model architecture: pass --load/--pretrained-checkpoint with a "
                        "checkpoint converted by `eaft-megatron convert hf-to-megatron` (it "
                        "stores hf/config.json) or --hf-config DIR (a Hugging Face config "
                        "directory)")


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)  # repr: exact round trip


def architecture_flags(hf_config: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """(value flags, boolean flags) of Megatron-LM describing the HF architecture."""
    from ..models import gpt_model_kwargs, transformer_config_from_hf

    c = transformer_config_from_hf(hf_config, transformer_impl="local")
    kw = gpt_model_kwargs(hf_config)
    values = [
        ("--num-layers", c.num_layers),
        ("--hidden-size", c.hidden_size),
        ("--ffn-hidden-size", c.ffn_hidden_size),
        ("--num-attention-heads", c.num_attention_heads),
        ("--num-query-groups", c.num_query_groups),
        ("--kv-channels", c.kv_channels),
        ("--normalization", c.normalization),
        ("--norm-epsilon", float(c.layernorm_epsilon)),
        ("--position-embedding-type", "rope"),
        ("--rotary-base", kw["rotary_base"]),
        ("--rotary-percent", float(kw["rotary_percent"])),
        ("--max-position-embeddings", kw["max_sequence_length"]),
        ("--init-method-std", float(c.init_method_std)),
        ("--hidden-dropout", float(c.hidden_dropout)),
        ("--attention-dropout", float(c.attention_dropout)),
    ]
    switches = ["--group-query-attention", "--swiglu", "--disable-bias-linear"]
    if c.add_qkv_bias:
        switches.append("--add-qkv-bias")
    if c.qk_layernorm:
        switches.append("--qk-layernorm")
    if c.rotary_interleaved:
        switches.append("--rotary-interleaved")
    if not kw["share_embeddings_and_output_weights"]:
        switches.append("--untie-embeddings-and-output-weights")
    if c.num_moe_experts:  # mixture of experts: megatron-core's MoE layer, as the HF router
        values += [
            ("--num-experts", c.num_moe_experts),
            ("--moe-router-topk", c.moe_router_topk),
            ("--moe-ffn-hidden-size", c.moe_ffn_hidden_size),
            ("--moe-router-score-function", c.moe_router_score_function),
            ("--moe-layer-freq", "[" + ",".join(map(str, c.moe_layer_freq)) + "]"),
        ]
        if c.moe_router_pre_softmax:
            switches.append("--moe-router-pre-softmax")
        if c.moe_shared_expert_intermediate_size:
            values.append(("--moe-shared-expert-intermediate-size",
                           c.moe_shared_expert_intermediate_size))
        if c.moe_shared_expert_gate:
            switches.append("--moe-shared-expert-gate")
        if c.moe_router_enable_expert_bias:
            switches.append("--moe-router-enable-expert-bias")
        if c.moe_router_num_groups:
            values += [("--moe-router-num-groups", c.moe_router_num_groups),
                       ("--moe-router-group-topk", c.moe_router_group_topk)]
        if c.moe_router_topk_scaling_factor:
            values.append(("--moe-router-topk-scaling-factor",
                           float(c.moe_router_topk_scaling_factor)))
    return [(f, _fmt(v)) for f, v in values], switches


def moe_training_flags(hf_config: Any) -> list[tuple[str, str]]:
    """MoE training settings that follow the HF model unless the user sets them: the
    load-balancing loss (``router_aux_loss_coef``), the all-to-all token dispatcher, the
    router's dtype (fp32 where the HF router computes in fp32)."""
    from ..models.config import moe_config_from_hf

    moe = moe_config_from_hf(hf_config)
    if not moe:
        return []
    flags = [("--moe-router-load-balancing-type", moe["moe_router_load_balancing_type"]),
             ("--moe-aux-loss-coeff", _fmt(float(moe["moe_aux_loss_coeff"]))),
             ("--moe-token-dispatcher-type", moe["moe_token_dispatcher_type"])]
    if moe.get("moe_router_dtype"):
        flags.append(("--moe-router-dtype", moe["moe_router_dtype"]))
    return flags


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


_DATA_FLAGS = ("--data-path", "--train-data-path", "--valid-data-path")


def _data_prefixes(argv: list[str]) -> dict[str, str]:
    """``{flag: prefix}`` of the prepared datasets named; each flag takes one prefix."""
    found = {}
    for flag in _DATA_FLAGS:
        values = flag_values(argv, flag)
        if values is None:
            continue
        if len(values) != 1:
            raise TrainArgError(f"{flag} takes one prepared prefix (eaft-megatron preprocess "
                                f"--output-prefix), got {values or 'none'}")
        found[flag] = values[0]
    if "--data-path" in found and "--train-data-path" in found:
        raise TrainArgError("give --data-path or --train-data-path, not both")
    return found


def check_data(argv: list[str]) -> dict | None:
    """Every prepared dataset named exists and is complete; returns the training one's summary.
    A missing one is named with the files expected (and prepared prefixes found beside it)."""
    from ..data.dataset import load_summary
    from ..data.writer import dataset_paths

    summaries = {}
    for flag, prefix in _data_prefixes(argv).items():
        try:
            summaries[flag] = load_summary(prefix)
        except (OSError, ValueError, KeyError) as e:
            expected = dataset_paths(prefix)
            files = ", ".join(Path(v).name + (".bin/.idx" if k in ("tokens", "loss_mask") else "")
                              for k, v in expected.items())
            parent = Path(prefix).parent
            nearby = sorted(str(parent / p.name[:-len("_summary.json")])
                            for p in parent.glob("*_summary.json")) if parent.is_dir() else []
            hint = f"; prepared prefixes in {parent}: {', '.join(nearby)}" if nearby else ""
            detail = str(e) if not isinstance(e, FileNotFoundError) else \
                f"not a complete prepared dataset (expected {files} in {parent})"
            raise TrainArgError(f"{flag} {prefix}: {detail}{hint}") from None
    return summaries.get("--data-path") or summaries.get("--train-data-path")


def _int_flag(argv: list[str], flag: str, default: int) -> int:
    value = flag_value(argv, flag)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise TrainArgError(f"{flag} {value!r} is not an integer") from None


def check_parallel_sizes(argv: list[str], hf_config: Any) -> None:
    """Tensor / pipeline sizes that the model's heads, query groups and layers allow."""
    tp = _int_flag(argv, "--tensor-model-parallel-size", 1)
    pp = _int_flag(argv, "--pipeline-model-parallel-size", 1)
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    layers = hf_config.num_hidden_layers
    for name, size in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
        if size < 1:
            raise TrainArgError(f"{name} {size} must be >= 1")
    if heads % tp or groups % tp:
        raise TrainArgError(f"--tensor-model-parallel-size {tp} does not divide the model's "
                            f"{heads} attention heads and {groups} query groups")
    ep = _int_flag(argv, "--expert-model-parallel-size", 1)
    etp = _int_flag(argv, "--expert-tensor-parallel-size", tp)
    if ep != 1 or etp != tp:
        from ..models import check_parallel_sizes as check_model_sizes

        try:
            check_model_sizes(hf_config, tp, 1, ep, etp)
        except ValueError as e:
            raise TrainArgError(f"--expert-model-parallel-size {ep} / "
                                f"--expert-tensor-parallel-size {etp}: {e}") from None
    if layers % pp and not (_has(argv, "--decoder-first-pipeline-num-layers") or
                            _has(argv, "--decoder-last-pipeline-num-layers")):
        raise TrainArgError(f"--pipeline-model-parallel-size {pp} does not divide the model's "
                            f"{layers} layers (or set --decoder-first/last-pipeline-num-layers)")


def check_eaft_flags(argv: list[str], hf_config: Any) -> None:
    """The EAFT flags parse and make a valid loss configuration for this vocabulary."""
    import argparse

    from ..megatron import EAFTLossConfig, add_eaft_args

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_eaft_args(parser)
    parser.error = lambda message: (_ for _ in ()).throw(TrainArgError(message))  # type: ignore
    known, _ = parser.parse_known_args(argv)
    try:
        config = EAFTLossConfig.from_args(known, vocab_size=hf_config.vocab_size)
    except ValueError as e:
        raise TrainArgError(f"invalid EAFT flags: {e}") from None
    if config.top_k > hf_config.vocab_size:
        raise TrainArgError(f"--eaft-top-k {config.top_k} exceeds the vocabulary "
                            f"({hf_config.vocab_size})")


def _architecture_of(hf_dir: Path) -> tuple:
    from ..convert import load_hf_config

    config = load_hf_config(hf_dir)
    values, switches = architecture_flags(config)
    return (tuple(getattr(config, "architectures", None) or ()), tuple(values),
            tuple(sorted(switches)), config.vocab_size)


def check_same_architecture(hf_dir: Path, checkpoint: str | None) -> None:
    """A checkpoint carrying its own ``hf/`` config must describe the model ``hf_dir`` does."""
    if checkpoint is None:
        return
    stored = Path(checkpoint) / "hf"
    if not (stored / "config.json").is_file() or stored.resolve() == hf_dir.resolve():
        return
    mine, theirs = _architecture_of(hf_dir), _architecture_of(stored)
    if mine != theirs:
        diff = [f"{a} vs {b}" for a, b in zip(dict(mine[1]).items(), dict(theirs[1]).items())
                if a != b][:3]
        raise TrainArgError(f"the checkpoint {checkpoint} is a different model than --hf-config "
                            f"{hf_dir} ({'; '.join(diff) or 'architecture differs'})")


def resolve_checkpoints(argv: list[str]) -> tuple[list[str], Start]:
    """``argv`` with ``--load``/``--pretrained-checkpoint``/``--finetune``/``--ckpt-step``
    replaced by the resolved start (see :mod:`.restart`)."""
    ckpt_step = flag_value(argv, "--ckpt-step")
    try:
        start = resolve_start(
            load=flag_value(argv, "--load"), save=flag_value(argv, "--save"),
            pretrained=flag_value(argv, "--pretrained-checkpoint"),
            finetune="--finetune" in argv, ckpt_step=None if ckpt_step is None else int(ckpt_step),
            training="--skip-train" not in argv)
    except CheckpointError as e:
        raise TrainArgError(str(e)) from None
    out = drop_flag(argv, "--pretrained-checkpoint")
    out = drop_flag(out, "--finetune", takes_value=False)
    if start.resumed:
        out = drop_flag(out, "--ckpt-step")
    if start.load is not None and flag_value(out, "--load") != start.load:
        out = drop_flag(out, "--load") + ["--load", start.load]
    if start.finetune:
        out.append("--finetune")
    if start.load is not None:
        step = flag_value(out, "--ckpt-step")
        check_checkpoint_files(start.load, int(step) if step is not None else
                               (start.iteration if start.resumed else None),
                               trust="--eaft-trust-checkpoint" in argv)
    return out, start


def check_checkpoint_files(root: str, iteration: int | None, *, trust: bool = False) -> None:
    """The torch_dist metadata of the checkpoint about to be loaded, read with the allow-listed
    unpickler, and the data files it lists present and long enough
    (:func:`eaft_megatron.convert.safe_metadata.validate_checkpoint_metadata`); unless
    ``trust``, every pickled entry checked against the allow-list without unpickling it
    (:func:`eaft_megatron.compat.safe_load.check_checkpoint_entries`)."""
    from ..compat.safe_load import check_checkpoint_entries
    from ..convert.io import ConversionError
    from ..convert.megatron_ckpt import find_iteration_dir
    from ..convert.safe_metadata import validate_checkpoint_metadata

    try:
        iteration_dir = find_iteration_dir(root, iteration)
        metadata = validate_checkpoint_metadata(iteration_dir)
        if not trust:
            check_checkpoint_entries(iteration_dir, metadata)
    except ConversionError as e:
        raise TrainArgError(str(e)) from None


def saved_expert_parallel_size(root: str, iteration: int | None, *,
                               trust: bool = False) -> int | None:
    """``--expert-model-parallel-size`` of the run that saved a trainer checkpoint (Megatron's
    args in its common state, unpickled with :func:`eaft_megatron.compat.safe_load.load_checked`,
    also with ``trust``: nothing is unpickled freely before Megatron's own loader; a refusal then
    only skips this check); None for a converted checkpoint or when it cannot be read (the loader
    then says why)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from ..compat.safe_load import COMMON_FILE, load_checked
    from ..convert.megatron_ckpt import find_iteration_dir
    from ..convert.safe_metadata import validate_checkpoint_metadata

    def load(data: bytes, where: str):  # a refusal under --eaft-trust-checkpoint is not reported
        return load_checked(data, where, record=not trust)

    try:
        iteration_dir = find_iteration_dir(root, iteration)
        common = iteration_dir / COMMON_FILE
        if common.is_file():
            state = load(common.read_bytes(), str(common))
        else:
            metadata = validate_checkpoint_metadata(iteration_dir)
            index, info = next((i, v) for i, v in metadata.storage_data.items()
                               if i.fqn.startswith("common_state") and isinstance(
                                   metadata.state_dict_metadata.get(i.fqn),
                                   BytesStorageMetadata))
            with open(iteration_dir / info.relative_path, "rb") as f:
                f.seek(info.offset)
                state = load(f.read(info.length), f"{info.relative_path} {index.fqn}")
            state = state[0] if isinstance(state, list) else state
        return int(state["args"].expert_model_parallel_size)
    except Exception:  # noqa: BLE001 - not a trainer checkpoint, or unreadable: not ours to say
        return None


def check_moe_tensor_parallel(argv: list[str], hf_config: Any, *, cpu: bool) -> None:
    """megatron-core's MoE layer refuses to train with TP > 1 without ``--sequence-parallel``
    (at the first forward, after loading); on CPU sequence parallelism is not available at all
    (the local spec's torch norms refuse it). Evaluation-only runs are not affected."""
    from ..models.config import moe_config_from_hf

    tp = _int_flag(argv, "--tensor-model-parallel-size", 1)
    if tp == 1 or "--skip-train" in argv or not moe_config_from_hf(hf_config):
        return
    if cpu:
        raise TrainArgError(f"--tensor-model-parallel-size {tp}: megatron-core trains MoE "
                            f"models with tensor parallelism only with --sequence-parallel, "
                            f"which its CPU (local) layer norms do not support; train at "
                            f"tensor-parallel size 1 on CPU (expert, pipeline and data "
                            f"parallelism work)")
    if not _has(argv, "--sequence-parallel"):
        raise TrainArgError(f"--tensor-model-parallel-size {tp}: megatron-core trains MoE "
                            f"models with tensor parallelism only with --sequence-parallel; "
                            f"add it")


def check_expert_parallel_resume(argv: list[str], start: Start) -> None:
    """Resuming training (optimizer state) at another expert-parallel size than the checkpoint
    was saved with fails inside megatron-core 0.19: its optimizer is a chain of one optimizer
    per data-parallel group (dense, expert), whose number changes with EP, and the saved chain
    does not load into another one. Weights load at any EP (evaluation, ``--finetune``)."""
    if start.load is None or start.finetune or "--skip-train" in argv:
        return
    saved = saved_expert_parallel_size(start.load, start.iteration,
                                       trust="--eaft-trust-checkpoint" in argv)
    ep = _int_flag(argv, "--expert-model-parallel-size", 1)
    if saved is not None and saved != ep:
        raise TrainArgError(
            f"--expert-model-parallel-size {ep}: the checkpoint {start.load} (iteration "
            f"{start.iteration}) was saved at expert-parallel size {saved}, and megatron-core "
            f"cannot load its optimizer state at another one; resume with "
            f"--expert-model-parallel-size {saved}, or load only its weights at {ep} "
            f"(--eval-only, or a new --save with --finetune: optimizer state and iteration "
            f"restart)")


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def gpu_fallback_flags(*, te_available: bool) -> list[str]:
    """On a GPU, Megatron-LM's defaults assume transformer-engine and apex: without TE the
    local spec and no rope fusion; without apex's CUDA extensions no gradient-accumulation
    fusion (fused_weight_gradient_mlp_cuda), masked-softmax fusion (scaled_masked_softmax_cuda)
    or persistent layer norm."""
    flags = [] if te_available else ["--transformer-impl local", "--no-rope-fusion"]
    if not _importable("fused_weight_gradient_mlp_cuda"):
        flags.append("--no-gradient-accumulation-fusion")
    if not _importable("scaled_masked_softmax_cuda"):
        flags.append("--no-masked-softmax-fusion")
    if not _importable("fast_layer_norm"):
        flags.append("--no-persist-layer-norm")
    return flags


def complete_argv(argv: list[str], *, cpu: bool, te_available: bool) -> tuple[list[str], LaunchInfo]:
    """``argv`` (without the program name) with the flags above added; see the module doc."""
    from ..convert import load_hf_config

    argv = ["--skip-train" if a == "--eval-only" else a for a in argv]
    given = list(argv)
    argv, start = resolve_checkpoints(argv)
    hf_dir = find_hf_dir(given, roots=(start.load, flag_value(given, "--save")))
    hf_config = load_hf_config(hf_dir)
    check_same_architecture(hf_dir, start.load)
    check_parallel_sizes(argv, hf_config)
    check_expert_parallel_resume(argv, start)
    check_moe_tensor_parallel(argv, hf_config, cpu=cpu)
    check_eaft_flags(argv, hf_config)
    summary = check_data(argv)
    added: list[str] = []

    def add(*items: str) -> None:
        added.extend(items)

    values, switches = architecture_flags(hf_config)
    for flag, value in values:
        given_value = flag_value(argv, flag)
        if given_value is None:
            add(flag, value)
        elif not _same(given_value, value):
            raise TrainArgError(f"{flag} {given_value} disagrees with the HF config in {hf_dir} "
                                f"({value}); drop the flag, the architecture is read from there")
    for flag in switches:
        if not _has(argv, flag):
            add(flag)
    for flag, value in moe_training_flags(hf_config):
        if not _has(argv, flag):
            add(flag, value)
    if not _has(argv, "--tokenizer-type"):
        add("--tokenizer-type", "NullTokenizer", "--vocab-size", str(hf_config.vocab_size))
    if not _has(argv, "--seq-length") and summary is not None:
        add("--seq-length", str(summary["seq_length"]))
    if not _has(argv, "--calculate-per-token-loss"):
        add("--calculate-per-token-loss")
    if "--skip-train" in argv and not (_has(argv, "--train-iters") or
                                       _has(argv, "--train-samples")):
        add("--train-iters", "0")
    if cpu:
        from ..compat import CPU_PRETRAIN_FLAGS

        flags = list(CPU_PRETRAIN_FLAGS)
        i = 0
        while i < len(flags):  # add each flag (with its value) unless the user chose it
            flag = flags[i]
            has_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
            if not _has(argv, flag):
                add(*flags[i:i + 1 + has_value])
            i += 1 + has_value
    else:
        for flag in gpu_fallback_flags(te_available=te_available):
            if not _has(argv, flag.split()[0]):
                add(*flag.split())
    return argv + added, LaunchInfo(hf_dir=hf_dir, hf_config=hf_config, cpu=cpu, added=added,
                                    start=start)
