"""eaft-megatron."""
