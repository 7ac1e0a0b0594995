"""Alias of :mod:`si_compress.quant.engine_torch` (the former module)."""
from ..quant.engine_torch import *  # noqa: F401,F403
