"""Start training from a Hugging Face model directory: no conversion step.

    torchrun --nproc-per-node 4 -m eaft_megatron.train --load RUN --save RUN \\
        --pretrained-checkpoint Qwen3-8B --tensor-model-parallel-size 2 ...

A directory holding ``config.json`` and no Megatron tracker is a Hugging Face model
(:func:`is_hf_model_dir`); :mod:`.restart` makes it the starting point exactly where a converted
checkpoint would be (``--save`` resumes first). Megatron-LM then gets no ``--load``: the model
provider (``steps.model_provider``) builds each model chunk at the job's TP/PP/EP layout
(without random initialisation: every element is overwritten) and :func:`fill_from_hf` fills
it before Megatron wraps it and builds the optimizer.

Each rank reads only the tensors its chunk needs: for every ``ShardedTensor`` of the chunk's
``sharded_state_dict()`` (megatron-core's own description of which part of which global tensor
a parameter holds, the one torch_dist loading uses), the checkpoint key and prepended
layer / expert offsets give the full TP=1 Megatron name, the architecture table
(:func:`eaft_megatron.models.hf_to_megatron` with ``only=``) computes that full tensor from the
HF tensors, and the rank copies its slice out of it: one full tensor at a time. Tensors the
table only renames and the rank holds whole rows of (the vocabulary tensors at TP > 1, norms,
routers) are read row-block-wise instead: only this rank's rows leave the file
(``SafetensorsReader.read_rows``), straight into the parameter when no dtype rounding is due.
Values go through the dtype ``eaft-megatron convert hf-to-megatron`` would store (the HF
config's dtype) and the vocabulary is padded with zero rows as conversion does, so the
parameters are bit-identical to conversion + load at the same layout.

Checks that fail in one line before any rank builds the model (:func:`check_hf_source`):
weights only as pickle (``.bin``), corrupt or truncated safetensors, tensors missing, left over
or of the wrong shape for the architecture, unsupported architectures. HF tensors the Megatron
model does not hold (GLM-4.5's MTP layers, Qwen3.5's MTP head and vision tower) are stored in
``<save>/hf/extra_tensors.safetensors`` (:func:`extra_tensors_writer`), as conversion does, so
``megatron-to-hf`` of the run writes them back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import TRACKER
from .flags import TrainArgError

__all__ = ["check_hf_source", "extra_tensors_writer", "fill_from_hf", "is_hf_model_dir"]


def is_hf_model_dir(path: str | Path | None) -> bool:
    """A Hugging Face model directory: ``config.json`` at its top, no Megatron tracker."""
    if path is None:
        return False
    path = Path(path)
    return (path / "config.json").is_file() and not (path / TRACKER).exists()


def _expected_and_carried(hf_dir: Path, hf_config: Any):
    """(reader, arch, HF names the table reads, HF names carried aside); raises
    ``ConversionError`` / ``ValueError`` naming the problem."""
    from .. import models
    from ..convert.convert import IGNORED_HF_SUFFIXES, extra_hf_tensors
    from ..convert.io import SafetensorsReader

    arch = models.get_arch(hf_config)
    models.linear_attention_config_from_hf(hf_config, arch)  # layer_types megatron lacks
    reader = SafetensorsReader(hf_dir)
    present = {n for n in reader.names() if not n.endswith(IGNORED_HF_SUFFIXES)}
    carried = extra_hf_tensors(arch, hf_config, present)
    return reader, arch, present - set(carried), carried


def check_hf_source(hf_dir: Path, hf_config: Any, flag: str) -> None:
    """The HF directory ``flag`` names can fill the model: safetensors weights (not pickle),
    readable headers whose data fits the files, exactly the tensors the architecture table
    reads, each of the shape it expects (checked on meta tensors: nothing is read)."""
    import torch

    from .. import models

    try:
        reader, arch, present, _ = _expected_and_carried(hf_dir, hf_config)
        expected = set(models.hf_names(arch, hf_config))
        if missing := sorted(expected - present):
            raise ValueError(f"lacks {len(missing)} tensor(s) the {arch.hf_architecture} "
                             f"mapping needs: {missing[:8]}")
        if extra := sorted(present - expected):
            raise ValueError(f"holds {len(extra)} tensor(s) the {arch.hf_architecture} mapping "
                             f"does not consume (wrong architecture?): {extra[:8]}")
        with torch.device("meta"):
            for _ in models.hf_to_megatron(arch, hf_config, reader.meta,
                                           padded_vocab=hf_config.vocab_size, te=False):
                pass
    except ValueError as e:  # ConversionError is a ValueError
        text = str(e)
        where = "" if str(hf_dir) in text else f"{hf_dir} "
        raise TrainArgError(f"{flag} {where}{text}") from None


def extra_tensors_writer(hf_dir: Path, hf_config: Any) -> Callable[[Path], None] | None:
    """Writes the HF tensors the Megatron model does not hold into ``<dir>/extra_tensors.
    safetensors`` (as ``convert hf-to-megatron`` does); None when there are none."""
    from ..convert.convert import EXTRA_TENSORS_FILE, write_extra_tensors

    reader, _, _, carried = _expected_and_carried(hf_dir, hf_config)
    if not carried:
        return None
    return lambda directory: write_extra_tensors(directory / EXTRA_TENSORS_FILE, reader,
                                                  carried)


_LAYERS = "decoder.layers."
_STACKED_EXPERTS = ".mlp.experts.experts."


def _full_name(key: str, indices: list[int]) -> str:
    """The TP=1 Megatron name (TransformerEngine-style, as in torch_dist keys) of a sharded
    tensor: its key with the prepended layer / expert indices put back into the name."""
    indices = list(indices)
    if key.startswith(_LAYERS) and not key[len(_LAYERS):].split(".", 1)[0].isdigit():
        if not indices:
            raise ValueError(f"sharded tensor {key!r} has no layer offset")
        key = f"{_LAYERS}{indices.pop(0)}.{key[len(_LAYERS):]}"
    if _STACKED_EXPERTS in key:
        if not indices:
            raise ValueError(f"sharded tensor {key!r} has no expert offset")
        key = key.replace(_STACKED_EXPERTS, f".mlp.experts.local_experts.{indices.pop(0)}.")
    if indices:
        raise ValueError(f"sharded tensor {key!r}: unexpected prepended axes {indices}")
    return key


def _rows_only(st) -> bool:
    """The sharded tensor is a block of whole rows of its (per layer / expert) global tensor."""
    axes = range(st.prepend_axis_num + 1, len(st.global_shape))
    return len(st.global_shape) > st.prepend_axis_num and all(
        st.global_offset[a] == 0 and st.data.shape[a - st.prepend_axis_num] == st.global_shape[a]
        for a in axes)


def _section_rows(parts: list) -> dict[str, tuple[int, int]]:
    """Sections of one parameter saved as separate tensors (megatron-core's
    ``_split_tensor_factory``: the gated DeltaNet's ``in_proj.weight.query`` / ``.key`` / ...
    and ``conv1d.weight.query`` ...): name -> (first row in the full TP=1 tensor, rows). The
    sections stack along the first dimension in the order the factory lists them; each is
    sharded over TP on its own."""
    rows: dict[str, tuple[int, int]] = {}
    for st, _, section in parts:
        if section is not None and section not in rows:
            n = st.global_shape[st.prepend_axis_num]
            rows[section] = (sum(r for _, r in rows.values()), n)
    return rows


def fill_from_hf(model, hf_config: Any, hf_dir: str | Path, *, padded_vocab: int) -> int:
    """Fill this rank's model chunk from the HF directory (see the module doc); returns the
    number of tensors copied. No collective: every rank reads its own share."""
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from .. import models
    from ..checkpoint.torch_dist import expand_factories, tensors_only
    from ..convert.convert import config_dtype, pass_through, resolve_dtype
    from ..convert.io import SafetensorsReader

    arch = models.get_arch(hf_config)
    stored_dtype = resolve_dtype(None, config_dtype(hf_config))  # what conversion stores
    local_name = dict(zip(models.megatron_names(arch, hf_config, te=True),
                          models.megatron_names(arch, hf_config, te=False)))
    state = {k: v for k, v in model.state_dict(keep_vars=True).items()
             if not k.endswith("_extra_state")}
    is_param = {id(p) for p in model.parameters()}
    sharded = model.sharded_state_dict()
    expand_factories(sharded, consume=False)  # fc1 halves: views into the parameter
    targets: dict[str, list] = {}
    covered: dict[int, int] = {}  # storage -> elements the sharded tensors write
    for st in nested_values(tensors_only(sharded)):
        if not isinstance(st, ShardedTensor):
            continue
        if st.flattened_range is not None:
            raise ValueError(f"sharded tensor {st.key!r} is flattened: not a model parameter")
        name, part = _full_name(st.key, st.global_offset[:st.prepend_axis_num]), None
        if name not in local_name and name.rpartition(".")[0] in local_name:
            name, _, part = name.rpartition(".")  # a named section (see _section_rows)
        if name not in local_name:
            raise ValueError(f"no {arch.hf_architecture} table entry for {name!r} "
                             f"(sharded tensor {st.key!r})")
        base = st.data if st.data._base is None else st.data._base
        covered[id(base)] = covered.get(id(base), 0) + st.data.numel()
        targets.setdefault(local_name[name], []).append((st, id(base) in is_param, part))
    # every element is written (the trainer builds the chunk without random initialisation)
    if uncovered := sorted(k for k, v in state.items() if covered.get(id(v), 0) < v.numel()):
        raise ValueError(f"parameters not (wholly) covered by sharded tensors: {uncovered[:8]}")
    first_row = {name: _section_rows(parts) for name, parts in targets.items()}

    reader = SafetensorsReader(hf_dir)
    copied = 0
    with torch.no_grad():
        # Renames split along their first dimension only (the vocabulary tensors at TP > 1):
        # only this rank's rows are read, the padding rows beyond the HF vocabulary zeroed.
        for hf_name, name in pass_through(arch, hf_config, reader).items():
            parts = targets.get(name, [])
            if not parts or not all(_rows_only(st) and part is None for st, _, part in parts):
                continue
            source = reader.meta(hf_name)
            rows = source.shape[0]
            for st, param, _ in targets.pop(name):
                start = st.global_offset[st.prepend_axis_num]
                stop = min(start + len(st.data), rows)
                if source.shape[1:] != st.data.shape[1:]:
                    raise ValueError(f"{hf_name} has rows of shape {tuple(source.shape[1:])}, "
                                     f"{name} expects {tuple(st.data.shape[1:])}")
                target = st.data[:max(stop - start, 0)]
                if stop > start and (target.dtype == source.dtype and target.is_contiguous()
                                     and target.device.type == "cpu"
                                     and (not param or stored_dtype == source.dtype)):
                    reader.read_rows(hf_name, start, stop, out=target)  # no copy in between
                elif stop > start:
                    part = reader.read_rows(hf_name, start, stop)
                    target.copy_(part.to(stored_dtype) if param else part)
                st.data[max(stop - start, 0):].zero_()
                copied += 1
        for name, full in models.hf_to_megatron(arch, hf_config, reader.get,
                                                padded_vocab=padded_vocab, te=False,
                                                only=targets):
            sections = first_row[name]
            if sections and (sum(n for _, n in sections.values()) != len(full)
                             or any(tuple(st.global_shape[st.prepend_axis_num + 1:])
                                    != tuple(full.shape[1:]) for st, _, _ in targets[name])):
                raise ValueError(f"{name}: the table gives {tuple(full.shape)}, the model's "
                                 f"sections expect {sections}")
            for st, param, section in targets.pop(name):
                offsets = list(st.global_offset[st.prepend_axis_num:])
                if section is not None:  # rows of the section, which starts at this row
                    offsets[0] += sections[section][0]
                elif tuple(full.shape) != tuple(st.global_shape[st.prepend_axis_num:]):
                    raise ValueError(f"{name}: the table gives {tuple(full.shape)}, the model "
                                     f"expects {tuple(st.global_shape[st.prepend_axis_num:])}")
                part = full[tuple(slice(o, o + n) for o, n in zip(offsets, st.data.shape))]
                st.data.copy_(part.to(stored_dtype) if param else part)
                copied += 1
            del full
    if targets:
        raise ValueError(f"the {arch.hf_architecture} table did not produce {sorted(targets)[:8]}")
    return copied
