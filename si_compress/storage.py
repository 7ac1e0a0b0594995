"""Alias of :mod:`si_compress.quant.storage` (the former module)."""
from .quant.storage import *  # noqa: F401,F403
