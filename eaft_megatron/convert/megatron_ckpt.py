"""Moved to :mod:`eaft_megatron.checkpoint` (layout) and :mod:`eaft_megatron.checkpoint.torch_dist`;
this name stays only until the tests import from there."""

from ..checkpoint import (  # noqa: F401
    TRACKER,
    checkpoint_tensor_shapes,
    find_iteration_dir,
    iteration_dir_name,
    validate_checkpoint_metadata,
)
from ..checkpoint.torch_dist import *  # noqa: F401,F403
from ..checkpoint.torch_dist import _expand_factories  # noqa: F401
