"""Checks that fail in one line before any heavy work (:func:`.argv.complete_argv` runs
them): prepared data present and complete and tokenized for the model's vocabulary,
parallel sizes the model allows, EAFT flags,
the checkpoint about to be loaded (its architecture, its files, its pickled entries, its
expert-parallel size), MoE training at TP > 1. Each raises :class:`.flags.TrainArgError`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import find_hf_dir
from .arch_flags import architecture_flags
from .flags import TrainArgError, flag_values, has_flag, int_flag
from .restart import Start

__all__ = ["check_checkpoint_files", "check_data", "check_data_vocabulary",
           "check_deltanet_packing", "check_eaft_flags", "check_expert_parallel_resume",
           "check_moe_tensor_parallel", "check_parallel_sizes", "check_same_architecture",
           "saved_expert_parallel_size"]


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


def check_data_vocabulary(argv: list[str], hf_config: Any) -> list[str]:
    """Every prepared dataset named fits the model's vocabulary: its largest token id
    (:func:`eaft_megatron.data.dataset.max_token_id`) below ``vocab_size`` (else the embedding
    fails at iteration 1, or the loss turns non-finite), and the tokenizer its summary records
    not larger than the model's vocabulary (then it is another tokenizer, even when the ids of
    this data happen to fit). Returns warnings (one line each) for a recorded tokenizer far
    smaller than the vocabulary: the ids are valid rows, and a model's vocabulary is often
    padded beyond its tokenizer (Qwen3: 151,669 tokens, 151,936 rows), so only a gap beyond
    ``max(1024, 1%)`` of the vocabulary is reported, and training goes on."""
    from ..data.dataset import load_summary, max_token_id

    vocab = int(hf_config.vocab_size)
    fix = ("prepare the data again with the model's own tokenizer (eaft-megatron preprocess "
           "--tokenizer <the model's Hugging Face directory>)")
    warnings = []
    for flag, prefix in _data_prefixes(argv).items():
        summary = load_summary(prefix)
        top = max_token_id(prefix, summary)
        tokenizer = summary.get("tokenizer") or {}
        size = tokenizer.get("vocab_size")
        made = f"tokenized with {tokenizer.get('path')} ({size} ids)" if size else ""
        if top >= vocab:
            was = f"; it was {made}" if made else ""
            raise TrainArgError(f"{flag} {prefix} holds token id {top}, the model's vocabulary "
                                f"has {vocab} ids (0-{vocab - 1}){was}: {fix}")
        if size and size > vocab:
            raise TrainArgError(f"{flag} {prefix} was {made}, more than the model's vocabulary "
                                f"of {vocab}: not the model's tokenizer (this data's ids fit only "
                                f"by chance, largest {top}); {fix}")
        if size and vocab - size > max(1024, vocab // 100):
            warnings.append(f"{flag} {prefix} was {made}, far fewer than the model's "
                            f"vocabulary of {vocab}: is it the model's tokenizer? (training "
                            f"goes on: its ids are valid rows)")
    return warnings


def check_parallel_sizes(argv: list[str], hf_config: Any) -> None:
    """Tensor / pipeline sizes that the model's heads, query groups and layers allow."""
    tp = int_flag(argv, "--tensor-model-parallel-size", 1)
    pp = int_flag(argv, "--pipeline-model-parallel-size", 1)
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    layers = hf_config.num_hidden_layers
    for name, size in (("--tensor-model-parallel-size", tp),
                       ("--pipeline-model-parallel-size", pp)):
        if size < 1:
            raise TrainArgError(f"{name} {size} must be >= 1")
    if heads % tp or groups % tp:
        raise TrainArgError(f"--tensor-model-parallel-size {tp} does not divide the model's "
                            f"{heads} attention heads and {groups} query groups")
    linear = [getattr(hf_config, f"linear_num_{kind}_heads", None) or 0
              for kind in ("key", "value")]
    if any(n % tp for n in linear):  # gated DeltaNet (Qwen3.5, Qwen3-Next)
        raise TrainArgError(f"--tensor-model-parallel-size {tp} does not divide the model's "
                            f"gated-DeltaNet heads ({linear[0]} key, {linear[1]} value)")
    ep = int_flag(argv, "--expert-model-parallel-size", 1)
    etp = int_flag(argv, "--expert-tensor-parallel-size", tp)
    if ep != 1 or etp != tp:
        from ..models import check_parallel_sizes as check_model_sizes

        try:
            check_model_sizes(hf_config, tp, 1, ep, etp)
        except ValueError as e:
            raise TrainArgError(f"--expert-model-parallel-size {ep} / "
                                f"--expert-tensor-parallel-size {etp}: {e}") from None
    if layers % pp and not (has_flag(argv, "--decoder-first-pipeline-num-layers") or
                            has_flag(argv, "--decoder-last-pipeline-num-layers")):
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
    stored = find_hf_dir(checkpoint) or (Path(checkpoint) if (Path(checkpoint) / "config.json")
                                         .is_file() else None)  # a HF model directory itself
    if stored is None or stored.resolve() == hf_dir.resolve():
        return
    mine, theirs = _architecture_of(hf_dir), _architecture_of(stored)
    if mine != theirs:
        diff = [f"{a} vs {b}" for a, b in zip(dict(mine[1]).items(), dict(theirs[1]).items())
                if a != b][:3]
        raise TrainArgError(f"the checkpoint {checkpoint} is a different model than --hf-config "
                            f"{hf_dir} ({'; '.join(diff) or 'architecture differs'})")


def check_checkpoint_files(root: str, iteration: int | None, *, trust: bool = False) -> None:
    """The torch_dist metadata of the checkpoint about to be loaded, read with the allow-listed
    unpickler, and the data files it lists present and long enough
    (:func:`eaft_megatron.checkpoint.validate_checkpoint_metadata`); unless
    ``trust``, every pickled entry checked against the allow-list without unpickling it
    (:func:`eaft_megatron.checkpoint.safe_load.check_checkpoint_entries`)."""
    from ..checkpoint import CheckpointError, find_iteration_dir, validate_checkpoint_metadata
    from ..checkpoint.safe_load import check_checkpoint_entries

    try:
        iteration_dir = find_iteration_dir(root, iteration)
        metadata = validate_checkpoint_metadata(iteration_dir)
        if not trust:
            check_checkpoint_entries(iteration_dir, metadata)
    except CheckpointError as e:
        raise TrainArgError(str(e)) from None


def saved_expert_parallel_size(root: str, iteration: int | None, *,
                               trust: bool = False) -> int | None:
    """``--expert-model-parallel-size`` of the run that saved a trainer checkpoint (Megatron's
    args in its common state, unpickled with
    :func:`eaft_megatron.checkpoint.safe_load.load_checked`,
    also with ``trust``: nothing is unpickled freely before Megatron's own loader; a refusal then
    only skips this check); None for a converted checkpoint or when it cannot be read (the loader
    then says why)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from ..checkpoint import find_iteration_dir, validate_checkpoint_metadata
    from ..checkpoint.safe_load import COMMON_FILE, load_checked

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


def check_deltanet_packing(argv: list[str], hf_config: Any, *, transformer_impl: str) -> None:
    """Gated-DeltaNet hybrids (Qwen3.5) on the local spec refuse packed data: megatron-core's
    DeltaNet restarts its state at a conversation boundary only with THD packed-sequence
    parameters (``cu_seqlens``), which megatron's local attention does not take (the local path
    keeps conversations apart with a dense mask, which the DeltaNet ignores), so the state of one
    conversation would flow into the next. The TransformerEngine path (THD) is not affected."""
    from ..data.dataset import load_summary
    from ..models import get_arch

    arch = get_arch(hf_config)
    if transformer_impl == "transformer_engine" or not arch.linear_attention:
        return
    for flag, prefix in _data_prefixes(argv).items():
        if load_summary(prefix).get("packed"):
            raise TrainArgError(
                f"{flag} {prefix} is packed (preprocess --pack): {arch.hf_architecture}'s gated "
                f"DeltaNet layers would carry their state from one conversation into the next "
                f"with --transformer-impl {transformer_impl} (megatron-core resets it only with "
                f"THD packed sequences, which its local attention does not take); prepare the "
                f"data without --pack, or train with --transformer-impl transformer_engine")


def check_moe_tensor_parallel(argv: list[str], hf_config: Any, *, cpu: bool) -> None:
    """megatron-core's MoE layer refuses to train with TP > 1 without ``--sequence-parallel``
    (at the first forward, after loading); on CPU sequence parallelism is not available at all
    (the local spec's torch norms refuse it). Evaluation-only runs are not affected."""
    from ..models.config import moe_config_from_hf

    tp = int_flag(argv, "--tensor-model-parallel-size", 1)
    if tp == 1 or "--skip-train" in argv or not moe_config_from_hf(hf_config):
        return
    if cpu:
        raise TrainArgError(f"--tensor-model-parallel-size {tp}: megatron-core trains MoE "
                            f"models with tensor parallelism only with --sequence-parallel, "
                            f"which its CPU (local) layer norms do not support; train at "
                            f"tensor-parallel size 1 on CPU (expert, pipeline and data "
                            f"parallelism work)")
    if not has_flag(argv, "--sequence-parallel"):
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
    ep = int_flag(argv, "--expert-model-parallel-size", 1)
    if saved is not None and saved != ep:
        raise TrainArgError(
            f"--expert-model-parallel-size {ep}: the checkpoint {start.load} (iteration "
            f"{start.iteration}) was saved at expert-parallel size {saved}, and megatron-core "
            f"cannot load its optimizer state at another one; resume with "
            f"--expert-model-parallel-size {saved}, or load only its weights at {ep} "
            f"(--eval-only, or a new --save with --finetune: optimizer state and iteration "
            f"restart)")
