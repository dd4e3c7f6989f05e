"""Complete a Megatron-LM command line: architecture from the HF config, CPU flags, EAFT defaults.

The user types only what is not architecture; :func:`complete_argv` adds, unless already given:

- the architecture flags derived from the HF config (``--hf-config DIR``, else ``<load>/hf/``,
  as written by ``eaft-megatron convert hf-to-megatron`` and by this trainer's ``--save``);
  a value typed by the user that disagrees with the HF config is an error;
- ``--tokenizer-type NullTokenizer --vocab-size V`` (the data is already tokenized) and
  ``--seq-length`` from the prepared data's summary;
- ``--finetune`` when ``--load`` is a converted HF model (it has ``eaft_megatron.json``): weights
  only, training starts at iteration 0;
- ``--calculate-per-token-loss`` (always: loss = sum of w*CE over the global batch / global
  number of supervised tokens), ``--train-iters 0`` for ``--skip-train`` / ``--eval-only``;
- on a machine without CUDA, ``eaft_megatron.compat.CPU_PRETRAIN_FLAGS`` (gloo, local spec,
  fusions off); on a GPU without transformer-engine, ``--transformer-impl local``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LaunchInfo", "TrainArgError", "complete_argv", "find_hf_dir", "flag_value"]


class TrainArgError(ValueError):
    """A command line that cannot describe a run (message says why)."""


@dataclass
class LaunchInfo:
    hf_dir: Path
    hf_config: Any
    cpu: bool
    added: list[str]


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` (``--flag V`` or ``--flag=V``; last one wins), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def _has(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def find_hf_dir(argv: list[str]) -> Path:
    """``--hf-config DIR``, else ``<--load>/hf`` or ``<--pretrained-checkpoint>/hf``."""
    explicit = flag_value(argv, "--hf-config")
    if explicit is not None:
        path = Path(explicit)
        if not (path / "config.json").is_file():
            raise TrainArgError(f"--hf-config {path}: no config.json there")
        return path
    for flag in ("--load", "--pretrained-checkpoint"):
        root = flag_value(argv, flag)
        if root is not None and (Path(root) / "hf" / "config.json").is_file():
            return Path(root) / "hf"
    raise TrainArgError("no model architecture: pass --load with a checkpoint converted by "
                        "`eaft-megatron convert hf-to-megatron` (it stores hf/config.json) or "
                        "--hf-config DIR (a Hugging Face config directory)")


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
    return [(f, _fmt(v)) for f, v in values], switches


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def _data_summary(argv: list[str]) -> dict | None:
    prefix = flag_value(argv, "--data-path")
    if prefix is None:
        return None
    path = f"{prefix}_summary.json"
    if not os.path.isfile(path):
        return None  # the dataset reader reports it with the full story
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def complete_argv(argv: list[str], *, cpu: bool, te_available: bool) -> tuple[list[str], LaunchInfo]:
    """``argv`` (without the program name) with the flags above added; see the module doc."""
    from ..convert import load_hf_config

    argv = ["--skip-train" if a == "--eval-only" else a for a in argv]
    hf_dir = find_hf_dir(argv)
    hf_config = load_hf_config(hf_dir)
    added: list[str] = []

    def add(*items: str) -> None:
        added.extend(items)

    values, switches = architecture_flags(hf_config)
    for flag, value in values:
        given = flag_value(argv, flag)
        if given is None:
            add(flag, value)
        elif not _same(given, value):
            raise TrainArgError(f"{flag} {given} disagrees with the HF config in {hf_dir} "
                                f"({value}); drop the flag, the architecture is read from there")
    for flag in switches:
        if not _has(argv, flag):
            add(flag)
    if not _has(argv, "--tokenizer-type"):
        add("--tokenizer-type", "NullTokenizer", "--vocab-size", str(hf_config.vocab_size))
    summary = _data_summary(argv)
    if not _has(argv, "--seq-length") and summary is not None:
        add("--seq-length", str(summary["seq_length"]))
    load = flag_value(argv, "--load")
    if load and (Path(load) / "eaft_megatron.json").is_file() and "--finetune" not in argv:
        # A converted HF model: weights only, iteration 0, and its stored args lack what
        # Megatron's resume check compares (num_layers, ...): load it as a fine-tuning start.
        add("--finetune")
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
    elif not te_available and not _has(argv, "--transformer-impl"):
        add("--transformer-impl", "local")
    return argv + added, LaunchInfo(hf_dir=hf_dir, hf_config=hf_config, cpu=cpu, added=added)
