"""Importing this module imports what the tests' child processes need (torch, megatron-core and
its training package, transformers, the package), as the entry points do (megatron's jit helpers
deferred first). The zygote (:mod:`tests.support.zygote`) and the fork server behind
:func:`tests.support.launch.spawn` import it once and fork their children afterwards, so that
each child skips ~5 s of imports. Nothing here may start a thread or touch a device."""

from __future__ import annotations

import gc
import importlib
import logging

from eaft_megatron.compat.lazy_compile import defer_torch_compile

MODULES = (
    "torch",
    "torch.distributed",
    "transformers",
    "transformers.models",  # its lazy import structure: a scan of every model file (~0.6 s)
    "transformers.models.auto.configuration_auto",
    "transformers.models.auto.modeling_auto",
    "megatron.core",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.models.gpt",
    "megatron.core.dist_checkpointing",
    "megatron.core.optimizer",
    "megatron.training",
    "megatron.training.arguments",
    "megatron.training.initialize",
    "megatron.training.training",
    "eaft_megatron.train.main",
    "eaft_megatron.train.steps",
    "eaft_megatron.megatron.loss",
    "eaft_megatron.models",
    "eaft_megatron.convert",
    "eaft_megatron.cli",
)

defer_torch_compile()
# as eaft_megatron.train.__main__ does: torch's "No CUDA runtime is found" notice says nothing
logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: not str(record.msg).startswith("No CUDA runtime is found"))
for _name in MODULES:
    importlib.import_module(_name)

# What is imported now lives as long as every child: out of the garbage collector's sight (the
# permanent generation). Otherwise each child's collections, and its exit, walk these objects
# and write to them (reference counts, GC headers), copying the pages fork shared: measured
# ~1.2 CPU s per forked child at exit alone, ~0.35 s frozen.
gc.freeze()
