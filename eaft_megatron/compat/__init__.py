"""Compatibility layers: running megatron-core on CPU (tests, the demo)."""

from .cpu import (
    CPU_DEVICE_ARCH_VERSION,
    CPU_PRETRAIN_FLAGS,
    cpu_compat,
    cpu_compat_installed,
    cpu_transformer_config_kwargs,
    install_cpu_compat,
    uninstall_cpu_compat,
)

__all__ = [
    "CPU_DEVICE_ARCH_VERSION",
    "CPU_PRETRAIN_FLAGS",
    "cpu_compat",
    "cpu_compat_installed",
    "cpu_transformer_config_kwargs",
    "install_cpu_compat",
    "uninstall_cpu_compat",
]
