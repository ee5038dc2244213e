"""dbp-mae-bench: decorrelated backpropagation (DBP) for ViTs, and the benchmark around it.

The method stands alone in `dbp.rule`, `dbp.layers` and `dbp.decorrelate` (torch only).
Its public names are imported on first use (PEP 562), so that torch-free parts of the
package (`dbp.config`, the `dbp gpus` wrapper, the results side) start without loading torch.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dbp.decorrelate import DBP, decor_modules, decorrelate, fuse, update_all
    from dbp.layers import DecorLinear, DecorMixin, DecorPatchEmbed

_LAZY = {"DBP": "dbp.decorrelate", "decor_modules": "dbp.decorrelate",
         "decorrelate": "dbp.decorrelate", "fuse": "dbp.decorrelate",
         "update_all": "dbp.decorrelate", "DecorLinear": "dbp.layers",
         "DecorMixin": "dbp.layers", "DecorPatchEmbed": "dbp.layers"}

__all__ = sorted(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name here."""
    if name not in _LAZY:
        raise AttributeError(f"module 'dbp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """Keeps `dbp.decorrelate` the function, as eager imports did: importing the submodule
    `dbp.decorrelate` binds it on the package, which would shadow the function of that name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
