"""dbp-mae-bench: decorrelated backpropagation (DBP) for ViTs, and the benchmark around it.

The method stands alone in `dbp.rule`, `dbp.layers` and `dbp.decorrelate` (torch only).
"""
from dbp.decorrelate import DBP, decor_modules, decorrelate, fuse, update_all
from dbp.layers import DecorLinear, DecorMixin, DecorPatchEmbed

__all__ = ["DBP", "DecorLinear", "DecorMixin", "DecorPatchEmbed", "decor_modules",
           "decorrelate", "fuse", "update_all"]
__version__ = "0.1.0"
