"""Alias of :mod:`si_compress.quant.shiftadd` and :mod:`si_compress.quant.pow2` (the former module)."""
from ..quant.pow2 import *  # noqa: F401,F403
from ..quant.shiftadd import *  # noqa: F401,F403
