"""Compatibility layers, the bottom floor of the package (imports nothing of eaft_megatron but
:mod:`eaft_megatron.paths`): the one patcher (:mod:`.patching`), running megatron-core on CPU
(tests, the demo) and the trainer's CPU set-up in :mod:`.cpu`, child processes that never
outlive their parent in :mod:`.processes`, megatron-core optimizer fixes in :mod:`.optimizer`.

The :mod:`.cpu` names are imported lazily, so that ``compat.processes`` stays free of torch
(preprocessing workers use it)."""

from importlib import import_module

_CPU = (
    "CPU_DEVICE_ARCH_VERSION",
    "CPU_PRETRAIN_FLAGS",
    "cpu_compat",
    "cpu_compat_installed",
    "cpu_transformer_config_kwargs",
    "install_cpu_compat",
    "run_device",
    "setup_cpu_training",
    "skip_helper_build",
    "uninstall_cpu_compat",
)

__all__ = list(_CPU)


def __getattr__(name: str):
    if name in _CPU:
        return getattr(import_module(".cpu", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
