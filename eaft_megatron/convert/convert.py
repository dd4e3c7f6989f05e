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

Peak host memory is about one copy of the model (plus one output shard on export; vocabulary
padding is written in place into the parameter). Outputs go through :mod:`eaft_megatron.paths`:
an output overlapping an input is refused, everything is written into an owner-named temporary
directory renamed at the very end, removed on any error or SIGINT/SIGTERM, and leftovers of
killed runs are removed by the next run. Checkpoint metadata is read without unpickling
anything but its own classes (:mod:`eaft_megatron.checkpoint.metadata`); a checkpoint with
NaN/Inf is refused unless ``allow_non_finite``. Expected mistakes raise :class:`ConversionError` (or
``paths.UnsafePathError``) with a one-line message.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from ..checkpoint import (
    CONVERTED_MARK,
    HF_DIR,
    HF_SIDE_FILES,
    checkpoint_tensor_shapes,
    copy_side_files,
    find_hf_dir,
    find_iteration_dir,
    load_model_weights,
    megatron_process_group,
    save_model_checkpoint,
)
from ..paths import atomic_output, check_output
from ..progress import Progress
from .io import (
    ConversionError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    write_safetensors,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EMBEDDING_KEY = "embedding.word_embeddings.weight"
_VOCAB_PARAMS = ("embedding.", "output_layer.")
# HF tensors that the Megatron model does not hold but a round trip must keep (GLM-4.5's MTP
# layers, ``ArchSpec.extra_hf_layers``): stored next to the HF config, written back on export.
EXTRA_TENSORS_FILE = "extra_tensors.safetensors"
# Tensors HF keeps in fp32 whatever the model dtype (megatron keeps the router's expert bias in
# fp32 too): exported in fp32.
KEEP_FP32_HF = (".e_score_correction_bias",)
# Non-parameter buffers some older HF checkpoints carry; safe to skip.
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


@contextlib.contextmanager
def _as_conversion_error():
    """The model layer reports bad configs / shapes as ValueError: make them ConversionErrors."""
    try:
        yield
    except ConversionError:
        raise
    except ValueError as e:
        raise ConversionError(str(e)) from e


def mapped(stream):
    """A mapping's ``(name, tensor)`` stream with its ValueErrors raised as ConversionErrors."""
    with _as_conversion_error():
        yield from stream


def _input_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        why = "is not a directory" if path.exists() else "does not exist"
        raise ConversionError(f"{what} {path} {why}")
    return path


def load_hf_config(directory: str | os.PathLike):
    """``AutoConfig`` from a local directory only (no hub, no remote code); for a
    vision-language architecture the language model's config (``models.language_model_config``:
    its ``text_config`` with the top-level ``architectures``)."""
    from transformers import AutoConfig

    from ..models import language_model_config

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConversionError(f"no config.json in {directory}")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True,
                                            trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        raise ConversionError(f"cannot read the HF config in {directory}: {e}") from e
    with _as_conversion_error():
        return language_model_config(config)


def config_dtype(hf_config) -> torch.dtype | None:
    """The HF config's ``dtype`` when it is one conversion stores (bf16/fp16/fp32), else None."""
    dt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if dt in DTYPES.values() else None


def resolve_dtype(name: str | None, fallback: torch.dtype | None) -> torch.dtype:
    """``--dtype name`` (bf16/fp16/fp32) as a torch dtype; None: ``fallback``, else fp32."""
    if name is None:
        return fallback or torch.float32
    if name not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_model(hf_config, *, padded_vocab: int, dtype: torch.dtype):
    """The whole model (TP=1, PP=1) with uninitialised parameters: filled right after."""
    from ..compat import cpu_transformer_config_kwargs
    from ..models import build_gpt_model, transformer_config_from_hf

    overrides = cpu_transformer_config_kwargs() if not torch.cuda.is_available() else {}
    # The local spec: this model is only a container of tensors (torch_dist checkpoints use
    # the same, TransformerEngine-style, names either way).
    overrides.update(use_cpu_initialization=True, perform_initialization=False,
                     params_dtype=dtype, transformer_impl="local")
    with _as_conversion_error():
        config = transformer_config_from_hf(hf_config, **overrides)
    return build_gpt_model(hf_config, config=config, pre_process=True, post_process=True,
                           padded_vocab=padded_vocab)


def model_parameters(model) -> dict[str, torch.Tensor]:
    """The model's state dict (parameters and buffers, as variables) without ``_extra_state``."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if not k.endswith("_extra_state")}


def pass_through(arch, hf_config, reader: SafetensorsReader) -> dict[str, str]:
    """HF name -> Megatron name of the tensors the mapping hands over unchanged (renames and
    the unpadded vocabulary tensors), found by running it on meta tensors (which also raises
    its shape errors before any work). Those are read straight into their parameter."""
    from .. import models

    requested: list[tuple[str, torch.Tensor]] = []

    def get(name: str) -> torch.Tensor:
        requested.append((name, reader.meta(name)))
        return requested[-1][1]

    found = {}
    for megatron_name, t in mapped(models.hf_to_megatron(
            arch, hf_config, get, padded_vocab=hf_config.vocab_size, te=False)):
        if len(requested) == 1 and t is requested[0][1]:
            found[requested[0][0]] = megatron_name
        requested.clear()
    return found


def _fill(name: str, param: torch.Tensor, tensor: torch.Tensor) -> None:
    """Put a converted tensor into its parameter (unless it was read there in place); a
    vocabulary tensor [V, ...] fills the first V rows of the padded parameter and the padding
    rows are zeroed, in place: no padded copy of it is ever made."""
    padded_rows = (name.startswith(_VOCAB_PARAMS) and tensor.dim() > 0
                   and tensor.shape[1:] == param.shape[1:] and tensor.shape[0] < param.shape[0])
    if tensor.shape != param.shape and not padded_rows:
        raise ConversionError(f"shape mismatch for {name}: converted {tuple(tensor.shape)}, "
                              f"Megatron model expects {tuple(param.shape)}")
    if tensor.data_ptr() != param.data_ptr():
        param[:len(tensor)].copy_(tensor)
    param[len(tensor):].zero_()  # padding rows (none but for vocabulary tensors): logit 0


def hf_to_megatron(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    drop_mtp: bool = False,
    nproc: int = 1,
) -> Path:
    """Convert a HF model directory into a Megatron-Core torch_dist checkpoint at ``out``.

    HF tensors of layers the Megatron model does not hold (GLM-4.5's multi-token-prediction
    layers) are copied unchanged into ``<out>/hf/extra_tensors.safetensors`` and written back by
    :func:`megatron_to_hf`; ``drop_mtp=True`` leaves them out. ``nproc > 1``: that many local
    processes fill and save a share of the parameters each (:mod:`.parallel`), holding about
    1/nproc of the model each; the parameters are the same as with one."""
    from .. import models
    from .parallel import check_nproc

    check_nproc(nproc)
    hf_dir = _input_dir(hf_dir, "HF model directory")
    inputs = {"--hf": hf_dir}
    check_output(out, inputs=inputs, force=force)
    hf_config = load_hf_config(hf_dir)
    with _as_conversion_error():
        arch = models.get_arch(hf_config)
        models.check_parallel_sizes(hf_config, tp, pp)
        models.linear_attention_config_from_hf(hf_config, arch)  # layer_types megatron lacks
        padded_vocab = models.padded_vocab_size(hf_config.vocab_size, tp)
        check_nproc(nproc, len(models.megatron_names(arch, hf_config, te=False)))
    torch_dtype = resolve_dtype(dtype, config_dtype(hf_config))

    reader = SafetensorsReader(hf_dir)
    expected = set(models.hf_names(arch, hf_config))
    present = {n for n in reader.names() if not n.endswith(IGNORED_HF_SUFFIXES)}
    carried = extra_hf_tensors(arch, hf_config, present)
    present -= set(carried)
    if missing := sorted(expected - present):
        raise ConversionError(f"{hf_dir} lacks {len(missing)} tensor(s) the "
                              f"{arch.hf_architecture} mapping needs: {missing[:8]}")
    if extra := sorted(present - expected):
        raise ConversionError(f"{len(extra)} tensor(s) in {hf_dir} are not consumed by the "
                              f"{arch.hf_architecture} mapping (wrong architecture?): {extra[:8]}")

    direct = pass_through(arch, hf_config, reader)

    with atomic_output(out, inputs=inputs, force=force) as tmp:
        bar = Progress(total=len(models.megatron_names(arch, hf_config, te=False)),
                       desc="hf -> megatron", unit="tensors", enabled=progress)
        if nproc > 1:
            from .parallel import run_workers

            with bar:
                run_workers(tmp, nproc, dict(
                    direction="hf-to-megatron", hf_dir=str(hf_dir), tp=tp, pp=pp,
                    padded_vocab=padded_vocab, dtype=str(torch_dtype).removeprefix("torch.")),
                    progress=bar)
        else:
            with megatron_process_group():
                model = build_model(hf_config, padded_vocab=padded_vocab, dtype=torch_dtype)
                params = {k: v.detach() for k, v in model_parameters(model).items()}
                with bar:
                    fill_parameters(params, arch, hf_config, reader, direct, bar=bar)
                save_model_checkpoint([model], tmp, iteration=0, consume=True,
                                      args=checkpoint_args(model.config, hf_config, tp=tp, pp=pp,
                                                           padded_vocab=padded_vocab))
                del model, params
        copy_side_files(hf_dir, tmp / HF_DIR,
                        [n for n in _side_names(hf_dir) if n != EXTRA_TENSORS_FILE])
        if carried and not drop_mtp:
            write_extra_tensors(tmp / HF_DIR / EXTRA_TENSORS_FILE, reader, carried)
        meta = dict(format=1, architecture=arch.hf_architecture, source=str(hf_dir.resolve()),
                    vocab_size=hf_config.vocab_size, padded_vocab_size=padded_vocab,
                    dtype=str(torch_dtype).removeprefix("torch."), tp=tp, pp=pp,
                    extra_tensors=0 if drop_mtp else len(carried),
                    dropped_tensors=len(carried) if drop_mtp else 0)
        (tmp / CONVERTED_MARK).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def fill_parameters(params: dict[str, torch.Tensor], arch, hf_config,
                    reader: SafetensorsReader, direct: dict[str, str], *,
                    only: set[str] | None = None, bar: Progress | None = None) -> None:
    """Fill the TP=1/PP=1 model's parameters ``params`` (name -> tensor) from the HF tensors
    through the architecture's table, one tensor at a time; ``direct``: :func:`pass_through`'s
    tensors, read straight into their parameter. ``only``: just these parameters (a
    ``--nproc`` worker's share; the HF tensors of the others are not read)."""
    from .. import models

    filled: set[str] = set()

    def get(hf_name: str) -> torch.Tensor:  # pass-through tensors: read into the parameter
        target, source = params.get(direct.get(hf_name, "")), reader.meta(hf_name)
        if (target is not None and target.device.type == "cpu"
                and source.dtype == target.dtype and source.dim() > 0
                and source.shape[1:] == target.shape[1:]
                and source.shape[0] <= target.shape[0]):
            return reader.read_into(hf_name, target[:source.shape[0]])
        return reader.get(hf_name)

    # Unpadded vocabulary from the mapping: _fill pads in place.
    stream = mapped(models.hf_to_megatron(arch, hf_config, get, only=only,
                                          padded_vocab=hf_config.vocab_size, te=False))
    with torch.no_grad():
        for name, tensor in stream:
            if name not in params:
                raise ConversionError(f"mapping produced {name!r}, which the Megatron model "
                                      f"does not have")
            if name in filled:
                raise ConversionError(f"mapping produced {name!r} twice")
            _fill(name, params[name], tensor)
            filled.add(name)
            del tensor
            if bar is not None:
                bar.update(1)
    if unfilled := sorted(set(params if only is None else only) - filled):
        raise ConversionError(f"{len(unfilled)} Megatron parameter(s) were not filled: "
                              f"{unfilled[:8]}")


def checkpoint_args(cfg, hf_config, *, tp: int, pp: int, padded_vocab: int) -> dict:
    """What Megatron-LM's load_checkpoint reads from a converted checkpoint's args: the fields
    check_checkpoint_args compares, and that it holds no optimizer / RNG state."""
    return dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size, add_position_embedding=False,
        position_embedding_type="rope",
        max_position_embeddings=hf_config.max_position_embeddings,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        padded_vocab_size=padded_vocab, no_save_optim=True, no_save_rng=True,
    )


def extra_hf_tensors(arch, hf_config, present: set[str]) -> list[str]:
    """Names of the HF tensors in layers ``num_hidden_layers ..`` + ``arch.extra_hf_layers``
    and under ``arch.extra_hf_prefixes`` (Qwen3.5's ``mtp.`` head and vision tower)."""
    count = int(getattr(hf_config, arch.extra_hf_layers, 0) or 0) if arch.extra_hf_layers else 0
    first = hf_config.num_hidden_layers
    prefixes = tuple(f"model.layers.{first + i}." for i in range(count))
    prefixes += tuple(arch.extra_hf_prefixes)
    return sorted(n for n in present if prefixes and n.startswith(prefixes))


# What a carried tensor belongs to, by a part of its name (the first match names it).
_CARRIED_KINDS = ((".visual.", "vision tower"), (".mtp.", "multi-token prediction"),
                  (".model.layers.", "multi-token prediction"))


def _carried_description(names: list[str]) -> str:
    """What the carried HF tensors ``names`` are, e.g. "vision tower, multi-token prediction"
    ("other" for a name no kind covers)."""
    found = {next((kind for part, kind in _CARRIED_KINDS if part in f".{name}"), "other")
             for name in names}
    return ", ".join(dict.fromkeys(k for _, k in (*_CARRIED_KINDS, ("", "other")) if k in found))


def write_extra_tensors(path: Path, reader: SafetensorsReader, names: list[str]) -> None:
    """One safetensors file of the named HF tensors, unchanged (GLM-4.5's MTP layers, Qwen3.5's
    MTP head and vision tower); its metadata says which of these it holds. Written by
    :func:`~.io.write_safetensors`: the same bytes on every run (safetensors' own writer orders
    the metadata differently from one process to the next)."""
    write_safetensors(path, {n: reader.get(n).contiguous() for n in names},
                      {"format": "pt", "eaft_megatron": "HF tensors the Megatron model does "
                       f"not hold ({_carried_description(names)}), written back on export"})


def non_finite_tensors(tensors: dict[str, torch.Tensor], *, chunk: int = 1 << 24) -> list[str]:
    """Names of the tensors holding NaN or +-Inf, each with what it holds ("nan", "inf",
    "nan+inf"). One min/max pass per chunk (NaN propagates into both, Inf shows in one): no
    tensor-sized mask, ~10x faster than ``isfinite`` for bf16 on CPU."""
    found = []
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        flat, nan, inf = t.reshape(-1), False, False
        for i in range(0, flat.numel(), chunk):
            part = flat[i:i + chunk]
            lo, hi = torch.aminmax(part)
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                nan = nan or bool(torch.isnan(part).any())
                inf = inf or bool(torch.isinf(part).any())
        if nan or inf:
            found.append(f"{name} ({'+'.join(k for k, v in (('nan', nan), ('inf', inf)) if v)})")
    return found


def megatron_to_hf(
    megatron_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    hf_config: str | os.PathLike | None = None,
    iteration: int | None = None,
    force: bool = False,
    allow_non_finite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = 1 << 30,
    nproc: int = 1,
) -> Path:
    """Convert a Megatron-Core torch_dist checkpoint (converted or trained) to a HF directory.
    A checkpoint with NaN/Inf values is refused (naming the tensors) unless ``allow_non_finite``.
    ``nproc > 1``: that many local processes share the shards (:mod:`.parallel`), each holding
    about 1/nproc of the model; the files are the same as with one."""
    from .. import models

    from .parallel import check_nproc

    check_nproc(nproc)

    megatron_dir = _input_dir(megatron_dir, "Megatron checkpoint directory")
    iter_dir = find_iteration_dir(megatron_dir, iteration)
    root = megatron_dir if iter_dir != megatron_dir else iter_dir.parent
    # --hf-config, else the hf/ stored with the checkpoint or with the directory above it
    hf_side = find_hf_dir(root, root.parent, hf_config=hf_config)
    if hf_side is None:
        raise ConversionError(f"no HF config stored with {root} (expected "
                              f"{root / HF_DIR}/config.json): pass --hf-config DIR")
    inputs = {"--megatron": megatron_dir, "--hf-config": hf_side}
    check_output(out, inputs=inputs, force=force)
    config = load_hf_config(hf_side)
    with _as_conversion_error():
        arch = models.get_arch(config)
        check_nproc(nproc, len(models.megatron_names(arch, config, te=False)))
    shapes = checkpoint_tensor_shapes(iter_dir)
    if EMBEDDING_KEY not in shapes:
        raise ConversionError(f"{iter_dir} has no {EMBEDDING_KEY}: not a GPT model checkpoint")
    (padded_vocab, hidden), ckpt_dtype = shapes[EMBEDDING_KEY]
    if padded_vocab < config.vocab_size or hidden != config.hidden_size:
        raise ConversionError(f"checkpoint embedding {padded_vocab}x{hidden} does not fit the HF "
                              f"config ({config.vocab_size} tokens x {config.hidden_size})")
    out_dtype = resolve_dtype(dtype, ckpt_dtype)  # default: what the checkpoint holds

    with atomic_output(out, inputs=inputs, force=force) as tmp:
        if nproc > 1:
            from .parallel import run_workers

            with Progress(total=len(models.hf_names(arch, config)), desc="megatron -> hf",
                          unit="tensors", enabled=progress) as bar:
                run_workers(tmp, nproc, dict(
                    direction="megatron-to-hf", iter_dir=str(iter_dir), hf_side=str(hf_side),
                    padded_vocab=padded_vocab, ckpt_dtype=str(ckpt_dtype).removeprefix("torch."),
                    out_dtype=str(out_dtype).removeprefix("torch."),
                    extra=str(hf_side / EXTRA_TENSORS_FILE)
                    if (hf_side / EXTRA_TENSORS_FILE).is_file() else None,
                    allow_non_finite=allow_non_finite, max_shard_bytes=max_shard_bytes),
                    progress=bar)
        else:
            _export(tmp, config, arch, iter_dir, hf_side, padded_vocab=padded_vocab,
                    ckpt_dtype=ckpt_dtype, out_dtype=out_dtype,
                    allow_non_finite=allow_non_finite, progress=progress,
                    max_shard_bytes=max_shard_bytes)
        copy_side_files(hf_side, tmp, [n for n in _side_names(hf_side)
                                       if n not in ("config.json", EXTRA_TENSORS_FILE)])
        raw = json.loads((hf_side / "config.json").read_text())
        key = "dtype" if "dtype" in raw else "torch_dtype"
        raw[key] = str(out_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return Path(out)


def _export(tmp: Path, config, arch, iter_dir: Path, hf_side: Path, *, padded_vocab: int,
            ckpt_dtype: torch.dtype, out_dtype: torch.dtype, allow_non_finite: bool,
            progress: bool, max_shard_bytes: int) -> None:
    """The shards and index of the HF checkpoint, in this process."""
    from .. import models

    with megatron_process_group():
        model = build_model(config, padded_vocab=padded_vocab, dtype=ckpt_dtype)
        load_model_weights([model], iter_dir)
        tensors = {k: v.detach() for k, v in model_parameters(model).items()}
        del model
    if not allow_non_finite and (bad := non_finite_tensors(tensors)):
        more = " ..." if len(bad) > 5 else ""
        raise ConversionError(f"{iter_dir} has non-finite values (NaN/Inf) in {len(bad)} "
                              f"tensor(s): {', '.join(bad[:5])}{more}; nothing written "
                              f"(--allow-non-finite converts it anyway)")
    expected = set(models.megatron_names(arch, config, te=False))
    unknown, absent = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if unknown or absent:
        raise ConversionError(f"the {arch.hf_architecture} mapping does not match the model: "
                              f"not consumed {unknown[:8]}, missing {absent[:8]}")

    def take(name: str) -> torch.Tensor:  # hand each parameter over once, then forget it
        try:
            return tensors.pop(name)
        except KeyError:
            raise ConversionError(f"mapping asked for {name!r} twice or it does not "
                                  f"exist") from None

    writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes)
    stream = mapped(models.megatron_to_hf(arch, config, take, te=False))
    with Progress(total=len(models.hf_names(arch, config)), desc="megatron -> hf",
                  unit="tensors", enabled=progress) as bar:
        for name, tensor in stream:
            keep = name.endswith(KEEP_FP32_HF) and tensor.dtype == torch.float32
            writer.add(name, tensor if keep else tensor.to(out_dtype))
            bar.update(1)
        if (hf_side / EXTRA_TENSORS_FILE).is_file():  # carried through: as stored
            from safetensors import safe_open

            with safe_open(str(hf_side / EXTRA_TENSORS_FILE), "pt") as f:
                for name in f.keys():
                    writer.add(name, f.get_tensor(name))
    if tensors:
        raise ConversionError(f"Megatron parameters not consumed by the {arch.hf_architecture} "
                              f"mapping: {sorted(tensors)[:8]}")
    writer.close()


def _side_names(directory: Path) -> list[str]:
    return [n for n in HF_SIDE_FILES if (directory / n).is_file()]


def prepare_command_line() -> None:
    """Process-wide settings for the ``convert`` command (call before megatron-core is
    imported): hide the notices megatron-core and torch print on every conversion that say
    nothing about it (optional GPU packages missing, "No CUDA runtime is found", deprecations
    inside megatron-core / torch.distributed.checkpoint; errors and other warnings still show),
    and skip the ``git rev-parse`` megatron-core runs at import (the command starts no process).
    """
    import logging
    import warnings

    os.environ.setdefault("NO_VCS_VERSION", "1")

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"torch\.distributed\.checkpoint\.")
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=".*deprecating ShardedTensor")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

    # (megatron's "GPTModel IS DEPRECATED" is dropped where models are built, build_gpt_model)
    def drop_known(record: logging.LogRecord) -> bool:
        return "async save is deprecated" not in record.getMessage()

    logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(drop_known)
