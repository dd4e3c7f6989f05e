"""Moved to :mod:`eaft_megatron.checkpoint.metadata`; this name stays only until the tests import
from there."""

from ..checkpoint.errors import UnsafeCheckpointError as UnsafeMetadataError  # noqa: F401
from ..checkpoint.metadata import *  # noqa: F401,F403
