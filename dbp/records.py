"""Atomic writes of records (text, JSON, bytes): a killed job never leaves a file that looks
complete. Torch-free, so the results side (analysis, tables, figures) can use it."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path, PurePath
from typing import IO, Any

import numpy as np

_UMASK = os.umask(0o022)  # read the process umask (the only portable way is to set it) ...
os.umask(_UMASK)          # ... and restore it at once


def atomic_write(path: str | os.PathLike, mode: str, write: Callable[[IO], None]) -> None:
    """Write through a temp file in the target's directory, fsync, then os.replace.

    Readers see the old file or the whole new one, never a partial write; on any failure the
    temp file is removed and an existing target is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable. Some network filesystems refuse fsync on a directory;
    # the file is already complete and in place by then, so that is not an error.
    with suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    atomic_write(path, "w", lambda f: f.write(text))


def _json_default(obj: Any) -> Any:
    """numpy scalars/arrays, torch tensors and paths, which metrics and configs often hold."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) or type(obj).__name__ == "Tensor":  # no torch import here
        return obj.tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Replace `path` with `obj` as indented JSON atomically (encoded fully before writing)."""
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    atomic_write_text(path, text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` atomically: a crash mid-save never corrupts the last checkpoint
    (torch is imported here, so this module stays torch-free for the results side)."""
    import torch
    atomic_write(path, "wb", lambda f: torch.save(obj, f))
