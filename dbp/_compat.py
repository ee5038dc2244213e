"""Compatibility shims for the tested stack (torch 2.13.0+cpu beside PyPI's torchvision
0.28.0, mmcv-lite 2.1.0, mmsegmentation 1.2.2, mmengine 0.10.7), which does not import as is.

Import this module before timm or torchvision, in every process (fork workers inherit it;
`dbp.model` imports it first): it applies shim 1 and the numpy part of 3. Shim 2 and the
mmengine part of 3 come with `mm_shims()`, which the segmentation side (export to mmseg,
fine-tuning, the probe) calls before importing mmcv, mmengine or mmseg; pre-training never
imports those (tested), which keeps about 0.4 s of imports off each of its jobs. Each shim is a no-op where the
problem does not exist, so the CUDA route is unaffected. The method modules (dbp.rule,
dbp.layers, dbp.decorrelate) need none of this and do not import it.

1. torchvision 0.28.0 from PyPI is a CUDA build; beside torch 2.13.0+cpu its _C.so cannot
   load and `import torchvision` raises "operator torchvision::nms does not exist". Defining
   the two op schemas first lets it import (compiled ops stay unavailable; timm needs none).
2. mmcv-lite has no compiled `mmcv._ext`, but mmseg 1.2.2 imports `mmcv.ops`
   unconditionally. A stub module (with a __spec__, which mmengine's Runner inspects) lets
   it import; any compiled op raises NotImplementedError if called (UperNet calls none).
3. Every checkpoint is loaded with torch.load(weights_only=True) (`safe_load`): a shared
   .pth must not run code. What dbp writes is tensors and plain values already; mmengine's own
   resume checkpoints also hold a message hub of HistoryBuffer objects (numpy arrays and
   scalars inside, and the buffer's statistics methods, pickled as getattr(HistoryBuffer,
   'min'|'max'|'current'|'mean')). Exactly those are allow-listed with add_safe_globals:
   HistoryBuffer, numpy.ndarray, numpy.dtype and the numeric/bool dtype classes,
   numpy._core.multiarray._reconstruct and .scalar, and, under the name builtins.getattr, a
   getattr that only returns those four HistoryBuffer methods. mmengine's local loader
   (resume, load_from, init_cfg=Pretrained) goes through `safe_load` too.
"""
from __future__ import annotations

import functools
import importlib
import importlib.machinery
import os.path as osp
import pickle
import re
import sys
import types
from typing import Any

import torch

from dbp.config import ConfigError


def _torchvision_shim() -> torch.library.Library | None:
    try:
        import torchvision  # noqa: F401
        return None
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        lib.define(schema)
    import torchvision  # noqa: F401,F811
    return lib  # must stay referenced, or the schemas are dropped


def _mmcv_ext_stub() -> None:
    try:
        importlib.import_module("mmcv._ext")
        return
    except ImportError:
        pass
    stub = types.ModuleType("mmcv._ext")
    stub.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)

    def _getattr(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def _missing(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name}: compiled mmcv ops are unavailable "
                                      "(mmcv-lite)")
        return _missing

    stub.__getattr__ = _getattr
    sys.modules["mmcv._ext"] = stub


class UnsafeCheckpointError(ConfigError):
    """A checkpoint that torch.load(weights_only=True) refuses: it holds Python objects beyond
    tensors and plain values, so unpickling it could run code. A ConfigError, so every CLI
    command reports it as one line naming the file."""


def safe_load(path: Any, map_location: Any = None, *, what: str = "checkpoint") -> Any:
    """torch.load(path, weights_only=True). A file that needs more than tensors, plain values
    and the allow-listed types (module docstring, 3) raises UnsafeCheckpointError naming it,
    before any of its objects is built; one that is no pickle the safe loader can read raises
    pickle.UnpicklingError naming it (one line). Other failures (missing, truncated zip)
    propagate as torch raises them."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "weights only load failed" not in text.lower():
            raise
        boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
        detail = " ".join(ln.strip() for ln in text.splitlines()
                          if ln.strip() and not ln.strip().startswith(boiler))
        found = re.search(r"GLOBAL (\S+)", detail)
        if found or "Can only build" in detail:
            holds = (f"the Python object {found.group(1)}" if found
                     else "Python objects other than tensors and plain values")
            raise UnsafeCheckpointError(
                f"{path}: refusing to load this {what}: it holds {holds}, and unpickling it "
                "could run code; load only checkpoints written by dbp (or by mmengine for "
                "dbp)") from None
        raise pickle.UnpicklingError(f"{path}: not a readable {what} "
                                     f"({detail or 'weights-only unpickling failed'})") from None


_HISTORY_BUFFER_METHODS = frozenset({"min", "max", "current", "mean"})


def _allow_numpy_types() -> None:
    """add_safe_globals for the numpy arrays, dtypes and scalars checkpoints may hold."""
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    dtypes = [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64,
                                          np.uint8, np.uint16, np.uint32, np.uint64,
                                          np.float16, np.float32, np.float64)]
    allowed: list[Any] = [np.ndarray, np.dtype, *dtypes]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):  # as numpy 2 / 1 pickle them
        allowed += [(_reconstruct, f"{mod}._reconstruct"), (scalar, f"{mod}.scalar")]
    torch.serialization.add_safe_globals(allowed)


def _allow_history_buffer() -> None:
    """add_safe_globals for the HistoryBuffer objects (and their statistics methods, pickled
    through getattr) that mmengine's resume checkpoints hold."""
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:
        return

    def history_buffer_method(obj: Any, name: str) -> Any:
        if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
            return getattr(obj, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL builtins.getattr is "
                                     f"allowed for HistoryBuffer statistics only, not {name!r}")
    torch.serialization.add_safe_globals([HistoryBuffer, (history_buffer_method, "builtins.getattr")])


def _mmengine_safe_loader() -> None:
    try:
        from mmengine.runner.checkpoint import CheckpointLoader
    except ImportError:
        return

    @CheckpointLoader.register_scheme(prefixes="", force=True)
    def _load_local_safe(filename: str, map_location=None):
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f"{filename} can not be found.")
        return safe_load(filename, map_location)


@functools.cache
def mm_shims() -> None:
    """Shim 2 and the mmengine part of 3 (module docstring), once per process: call before
    importing mmcv, mmengine or mmseg."""
    _mmcv_ext_stub()
    _allow_history_buffer()
    _mmengine_safe_loader()


_TV_LIB = _torchvision_shim()
_allow_numpy_types()
