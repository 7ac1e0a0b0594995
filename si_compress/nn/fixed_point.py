"""Alias of :mod:`si_compress.quant.primitives` and :mod:`si_compress.quant.fakequant` (the former module)."""
from ..quant.fakequant import *  # noqa: F401,F403
from ..quant.primitives import *  # noqa: F401,F403
