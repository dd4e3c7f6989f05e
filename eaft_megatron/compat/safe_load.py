"""Moved to :mod:`eaft_megatron.checkpoint.safe_load`; this name stays only until the tests import
from there."""

from ..checkpoint.safe_load import *  # noqa: F401,F403
from ..checkpoint.safe_load import COMMON_FILE, TRUST_FLAG  # noqa: F401
