"""Former home of the quantized layers; they live in :mod:`si_compress.quant` now (this name stays an alias)."""
from ..quant import *  # noqa: F401,F403
from ..quant import __all__  # noqa: F401
