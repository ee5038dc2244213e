"""Compatibility shims for the tested stack (torch 2.13.0+cpu beside PyPI's torchvision
0.28.0, mmcv-lite 2.1.0, mmsegmentation 1.2.2, mmengine 0.10.7), which does not import as is.

Import this module before timm, torchvision or mmseg, in every process (fork workers inherit
it; `dbp.model` and the segmentation code import it first). Each shim is a no-op where the
problem does not exist, so the CUDA route is unaffected. The method modules (dbp.rule,
dbp.layers, dbp.decorrelate) need none of this and do not import it.

1. torchvision 0.28.0 from PyPI is a CUDA build; beside torch 2.13.0+cpu its _C.so cannot
   load and `import torchvision` raises "operator torchvision::nms does not exist". Defining
   the two op schemas first lets it import (compiled ops stay unavailable; timm needs none).
2. mmcv-lite has no compiled `mmcv._ext`, but mmseg 1.2.2 imports `mmcv.ops`
   unconditionally. A stub module (with a __spec__, which mmengine's Runner inspects) lets
   it import; any compiled op raises NotImplementedError if called (UperNet calls none).
3. torch >= 2.6 defaults torch.load to weights_only=True, which rejects mmengine's own
   checkpoints (HistoryBuffer, numpy objects) on resume/load_from/Pretrained. Our
   checkpoints are local and trusted, so mmengine's local loader uses weights_only=False.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os.path as osp
import sys
import types

import torch


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


def _mmengine_trusted_loader() -> None:
    try:
        from mmengine.runner.checkpoint import CheckpointLoader
    except ImportError:
        return

    @CheckpointLoader.register_scheme(prefixes="", force=True)
    def _load_local_trusted(filename: str, map_location=None):
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f"{filename} can not be found.")
        return torch.load(filename, map_location=map_location, weights_only=False)


_TV_LIB = _torchvision_shim()
_mmcv_ext_stub()
_mmengine_trusted_loader()
