"""Complete a Megatron-LM command line: architecture from the HF config, CPU flags, EAFT defaults.

This module puts the pieces together; the flag strings are read in :mod:`.flags`, the HF config
becomes Megatron-LM flags in :mod:`.arch_flags`, the one-line checks are in :mod:`.preflight`.

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
  (``--data-path`` / ``--train-data-path`` / ``--valid-data-path``) and tokenized for the
  model's vocabulary (:func:`check_data_vocabulary`), tensor/pipeline sizes that
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

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arch_flags import architecture_flags, gpu_fallback_flags, moe_training_flags
from .flags import TrainArgError, drop_flag, flag_value, flag_values, has_flag
from .export import check_export_dir
from .hf_load import check_hf_source
from .outputs import check_output_paths
from .preflight import (
    check_checkpoint_files,
    check_data,
    check_data_vocabulary,
    check_deltanet_packing,
    check_eaft_flags,
    check_expert_parallel_resume,
    check_moe_tensor_parallel,
    check_parallel_sizes,
    check_same_architecture,
)
from .restart import CheckpointError, Start, resolve_start

__all__ = ["LaunchInfo", "TrainArgError", "complete_argv", "drop_flag", "find_hf_dir", "flag_value",
           "flag_values"]


@dataclass
class LaunchInfo:
    hf_dir: Path
    hf_config: Any
    cpu: bool
    added: list[str]
    start: Start


def find_hf_dir(argv: list[str], roots: tuple[str | None, ...] = ()) -> Path:
    """``--hf-config DIR``, else the ``hf/`` directory stored with the first checkpoint root
    that has one: ``roots`` (the resolved start), ``--load``, ``--pretrained-checkpoint``
    (:func:`eaft_megatron.checkpoint.find_hf_dir`)."""
    from ..checkpoint import find_hf_dir as find_stored

    try:
        found = find_stored(*roots, flag_value(argv, "--load"),
                            flag_value(argv, "--pretrained-checkpoint"),
                            hf_config=flag_value(argv, "--hf-config"))
    except CheckpointError as e:
        raise TrainArgError(str(e)) from None
    if found is None:
        raise TrainArgError("no model architecture: pass --load/--pretrained-checkpoint with a "
                            "checkpoint converted by `eaft-megatron convert hf-to-megatron` (it "
                            "stores hf/config.json) or --hf-config DIR (a Hugging Face config "
                            "directory)")
    return found


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


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
    if start.hf is not None:  # read by the model provider, not by Megatron's loader
        out = drop_flag(out, "--load")
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


def complete_argv(argv: list[str], *, cpu: bool,
                  te_available: bool) -> tuple[list[str], LaunchInfo]:
    """``argv`` (without the program name) with the flags above added; see the module doc."""
    from ..convert import load_hf_config

    argv = ["--skip-train" if a == "--eval-only" else a for a in argv]
    check_output_paths(argv)  # before any work: a bad output path fails now, not late
    given = list(argv)
    argv, start = resolve_checkpoints(argv)
    if start.hf is not None and flag_value(given, "--hf-config") is None:
        hf_dir = Path(start.hf)
    else:
        hf_dir = find_hf_dir(given, roots=(start.load, flag_value(given, "--save")))
    hf_config = load_hf_config(hf_dir)
    check_same_architecture(hf_dir, start.load or start.hf)
    if start.hf is not None:
        check_hf_source(Path(start.hf), hf_config if hf_dir == Path(start.hf) else
                        load_hf_config(start.hf), start.hf_flag)
    check_parallel_sizes(argv, hf_config)
    check_expert_parallel_resume(argv, start)
    check_moe_tensor_parallel(argv, hf_config, cpu=cpu)
    check_eaft_flags(argv, hf_config)
    check_export_dir(given)
    summary = check_data(argv)
    for warning in check_data_vocabulary(argv, hf_config):
        if os.environ.get("RANK", "0") == "0":
            print(f"eaft_megatron.train: warning: {warning}", file=sys.stderr, flush=True)
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
        if not has_flag(argv, flag):
            add(flag)
    for flag, value in moe_training_flags(hf_config):
        if not has_flag(argv, flag):
            add(flag, value)
    if not has_flag(argv, "--tokenizer-type"):
        add("--tokenizer-type", "NullTokenizer", "--vocab-size", str(hf_config.vocab_size))
    if not has_flag(argv, "--seq-length") and summary is not None:
        add("--seq-length", str(summary["seq_length"]))
    if not has_flag(argv, "--calculate-per-token-loss"):
        add("--calculate-per-token-loss")
    if "--skip-train" in argv and not (has_flag(argv, "--train-iters") or
                                       has_flag(argv, "--train-samples")):
        add("--train-iters", "0")
    if cpu:
        from ..compat import CPU_PRETRAIN_FLAGS

        flags = list(CPU_PRETRAIN_FLAGS)
        i = 0
        while i < len(flags):  # add each flag (with its value) unless the user chose it
            flag = flags[i]
            has_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
            if not has_flag(argv, flag):
                add(*flags[i:i + 1 + has_value])
            i += 1 + has_value
    else:
        for flag in gpu_fallback_flags(te_available=te_available):
            if not has_flag(argv, flag.split()[0]):
                add(*flag.split())
    check_deltanet_packing(argv, hf_config, transformer_impl=flag_value(
        argv + added, "--transformer-impl") or "transformer_engine")
    return argv + added, LaunchInfo(hf_dir=hf_dir, hf_config=hf_config, cpu=cpu, added=added,
                                    start=start)
