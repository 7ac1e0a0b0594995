"""Alias of :mod:`si_compress.quant.api` and :mod:`si_compress.quant.sparsity` (the former module)."""
from .quant.api import *  # noqa: F401,F403
from .quant.sparsity import *  # noqa: F401,F403
