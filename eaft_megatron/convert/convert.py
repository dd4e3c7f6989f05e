"""Hugging Face <-> Megatron-Core checkpoint conversion, one process, tensor by tensor.

    eaft-megatron convert hf-to-megatron --hf Qwen3-8B --out qwen3-8b-mcore --tp 2 --pp 2
    eaft-megatron convert megatron-to-hf --megatron runs/sft --out qwen3-8b-sft

HF -> Megatron: read ``config.json`` (``transformers.AutoConfig``, local files, never remote
code), build the GPTModel of that architecture once at TP=1/PP=1 without initialising it, fill
every parameter from the safetensors files one tensor at a time through the architecture's
mapping table (:mod:`eaft_megatron.models`), and save it with ``dist_checkpointing`` in
Megatron-LM's layout. torch_dist stores global tensors, so the result loads at any TP/PP that
divides the model; ``--tp`` sets the vocabulary padding (a multiple of 128 x tp, so any TP that
divides ``tp`` loads it too) and is checked against the heads and query groups, ``--pp``
against the layers. The HF config and tokenizer files are stored in ``<out>/hf/`` so the
checkpoint describes itself; ``<out>/eaft_megatron.json`` records the conversion.

Megatron -> HF: works on converted checkpoints and on trainer checkpoints of any iteration
(optimizer state is ignored): the model is loaded from the torch_dist files into a TP=1/PP=1
model, the parameters are handed to the mapping one by one and freed as soon as they are
written, into sharded safetensors + index, with the config and tokenizer files.

Peak host memory is about one copy of the model (plus one output shard on export). Output is
written to a temporary directory renamed at the very end; any error leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .io import (
    ConversionError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    check_output_dir,
    copy_side_files,
)
from .megatron_ckpt import (
    checkpoint_tensor_shapes,
    find_iteration_dir,
    load_model_weights,
    megatron_process_group,
    save_model_checkpoint,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_SUBDIR = "hf"
METADATA_FILE = "eaft_megatron.json"
EMBEDDING_KEY = "embedding.word_embeddings.weight"
# Non-parameter buffers some older HF checkpoints carry; safe to skip.
_IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor", disable=not enabled)


def load_hf_config(directory: str | os.PathLike):
    """``AutoConfig`` from a local directory only (no hub, no remote code)."""
    from transformers import AutoConfig

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConversionError(f"no config.json in {directory}")
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        raise ConversionError(f"cannot read the HF config in {directory}: {e}") from e


def _config_dtype(hf_config) -> torch.dtype | None:
    dt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if dt in DTYPES.values() else None


def _resolve_dtype(name: str | None, fallback: torch.dtype | None) -> torch.dtype:
    if name is None:
        return fallback or torch.float32
    if name not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _build_model(hf_config, *, padded_vocab: int, dtype: torch.dtype):
    """The whole model (TP=1, PP=1) with uninitialised parameters: filled right after."""
    from ..compat import cpu_transformer_config_kwargs
    from ..models import build_gpt_model, transformer_config_from_hf

    overrides = cpu_transformer_config_kwargs() if not torch.cuda.is_available() else {}
    # The local spec: this model is only a container of tensors (torch_dist checkpoints use
    # the same, TransformerEngine-style, names either way).
    overrides.update(use_cpu_initialization=True, perform_initialization=False,
                     params_dtype=dtype, transformer_impl="local")
    config = transformer_config_from_hf(hf_config, **overrides)
    return build_gpt_model(hf_config, config=config, pre_process=True, post_process=True,
                           padded_vocab=padded_vocab)


def _parameters(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if not k.endswith("_extra_state")}


def hf_to_megatron(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a HF model directory into a Megatron-Core torch_dist checkpoint at ``out``."""
    from .. import models

    hf_dir = Path(hf_dir)
    check_output_dir(out, force=force)
    hf_config = load_hf_config(hf_dir)
    arch = models.get_arch(hf_config)
    models.check_parallel_sizes(hf_config, tp, pp)
    torch_dtype = _resolve_dtype(dtype, _config_dtype(hf_config))
    padded_vocab = models.padded_vocab_size(hf_config.vocab_size, tp)

    reader = SafetensorsReader(hf_dir)
    expected = set(models.hf_names(arch, hf_config))
    present = {n for n in reader.names() if not n.endswith(_IGNORED_HF_SUFFIXES)}
    if missing := sorted(expected - present):
        raise ConversionError(f"{hf_dir} lacks {len(missing)} tensor(s) the {arch.hf_architecture} mapping "
                              f"needs: {missing[:8]}")
    if extra := sorted(present - expected):
        raise ConversionError(f"{len(extra)} tensor(s) in {hf_dir} are not consumed by the "
                              f"{arch.hf_architecture} mapping (wrong architecture?): {extra[:8]}")

    with megatron_process_group():
        model = _build_model(hf_config, padded_vocab=padded_vocab, dtype=torch_dtype)
        params = _parameters(model)
        filled: set[str] = set()
        stream = models.hf_to_megatron(arch, hf_config, reader.get, padded_vocab=padded_vocab,
                                       te=False)
        with torch.no_grad():
            for name, tensor in _progress(stream, total=len(params), desc="hf -> megatron",
                                          enabled=progress):
                if name not in params:
                    raise ConversionError(f"mapping produced {name!r}, which the Megatron model "
                                          f"does not have")
                if name in filled:
                    raise ConversionError(f"mapping produced {name!r} twice")
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ConversionError(f"shape mismatch for {name}: converted "
                                          f"{tuple(tensor.shape)}, Megatron model expects "
                                          f"{tuple(params[name].shape)}")
                params[name].copy_(tensor)
                filled.add(name)
        if unfilled := sorted(set(params) - filled):
            raise ConversionError(f"{len(unfilled)} Megatron parameter(s) were not filled: "
                                  f"{unfilled[:8]}")
        with atomic_output_dir(out, force=force) as tmp:
            # What Megatron-LM's load_checkpoint reads from a checkpoint's args: the fields
            # check_checkpoint_args compares, and that it holds no optimizer / RNG state.
            cfg = model.config
            save_model_checkpoint([model], tmp, iteration=0, consume=True, args=dict(
                num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_attention_heads,
                num_query_groups=cfg.num_query_groups, kv_channels=cfg.kv_channels,
                ffn_hidden_size=cfg.ffn_hidden_size, add_position_embedding=False,
                position_embedding_type="rope",
                max_position_embeddings=hf_config.max_position_embeddings,
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                padded_vocab_size=padded_vocab, no_save_optim=True, no_save_rng=True,
            ))
            copy_side_files(hf_dir, tmp / HF_SUBDIR)
            meta = dict(format=1, architecture=arch.hf_architecture, source=str(hf_dir.resolve()),
                        vocab_size=hf_config.vocab_size, padded_vocab_size=padded_vocab,
                        dtype=str(torch_dtype).removeprefix("torch."), tp=tp, pp=pp)
            (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def find_hf_config_dir(megatron_dir: Path, hf_config: str | os.PathLike | None) -> Path:
    if hf_config is not None:
        return Path(hf_config)
    for candidate in (megatron_dir / HF_SUBDIR, megatron_dir.parent / HF_SUBDIR):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConversionError(f"no HF config stored with {megatron_dir} (expected "
                          f"{megatron_dir / HF_SUBDIR}/config.json): pass --hf-config DIR")


def megatron_to_hf(
    megatron_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    hf_config: str | os.PathLike | None = None,
    iteration: int | None = None,
    force: bool = False,
    progress: bool = True,
    max_shard_bytes: int = 1 << 30,
) -> Path:
    """Convert a Megatron-Core torch_dist checkpoint (converted or trained) to a HF directory."""
    from .. import models

    check_output_dir(out, force=force)
    iter_dir = find_iteration_dir(megatron_dir, iteration)
    root = Path(megatron_dir) if iter_dir != Path(megatron_dir) else iter_dir.parent
    hf_side = find_hf_config_dir(root, hf_config)
    config = load_hf_config(hf_side)
    arch = models.get_arch(config)
    shapes = checkpoint_tensor_shapes(iter_dir)
    if EMBEDDING_KEY not in shapes:
        raise ConversionError(f"{iter_dir} has no {EMBEDDING_KEY}: not a GPT model checkpoint")
    (padded_vocab, hidden), ckpt_dtype = shapes[EMBEDDING_KEY]
    if padded_vocab < config.vocab_size or hidden != config.hidden_size:
        raise ConversionError(f"checkpoint embedding {padded_vocab}x{hidden} does not fit the HF "
                              f"config ({config.vocab_size} tokens x {config.hidden_size})")
    out_dtype = _resolve_dtype(dtype, ckpt_dtype)  # default: what the checkpoint holds

    with megatron_process_group():
        model = _build_model(config, padded_vocab=padded_vocab, dtype=ckpt_dtype)
        load_model_weights([model], iter_dir)
        tensors = {k: v.detach() for k, v in _parameters(model).items()}
        del model
    expected = set(models.megatron_names(arch, config, te=False))
    unknown, absent = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if unknown or absent:
        raise ConversionError(f"the {arch.hf_architecture} mapping does not match the model: not consumed "
                              f"{unknown[:8]}, missing {absent[:8]}")

    def take(name: str) -> torch.Tensor:  # hand each parameter over once, then forget it
        try:
            return tensors.pop(name)
        except KeyError:
            raise ConversionError(f"mapping asked for {name!r} twice or it does not exist") from None

    hf_names = models.hf_names(arch, config)
    with atomic_output_dir(out, force=force) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes)
        stream = models.megatron_to_hf(arch, config, take, te=False)
        for name, tensor in _progress(stream, total=len(hf_names), desc="megatron -> hf",
                                      enabled=progress):
            writer.add(name, tensor.to(out_dtype))
        if tensors:
            raise ConversionError(f"Megatron parameters not consumed by the {arch.hf_architecture} "
                                  f"mapping: {sorted(tensors)[:8]}")
        writer.close()
        copy_side_files(hf_side, tmp, [n for n in _side_names(hf_side) if n != "config.json"])
        raw = json.loads((hf_side / "config.json").read_text())
        key = "dtype" if "dtype" in raw else "torch_dtype"
        raw[key] = str(out_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return Path(out)


def _side_names(directory: Path) -> list[str]:
    from .io import HF_SIDE_FILES

    return [n for n in HF_SIDE_FILES if (directory / n).is_file()]
