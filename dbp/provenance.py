"""What stands beside every result (docs/protocol.md, audit): code version, package versions,
hardware; and quiet output where no one watches (CI, batch jobs)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dbp.config import NUMERICS_ENV

_PACKAGES = {"torch": ("torch",), "torchvision": ("torchvision",), "timm": ("timm",),
             "mmseg": ("mmsegmentation",), "mmengine": ("mmengine",),
             "mmcv": ("mmcv", "mmcv-lite"), "codecarbon": ("codecarbon",), "numpy": ("numpy",)}


def _version(dists: tuple[str, ...]) -> str:
    """Installed version from package metadata (no import), naming the variant if not the first."""
    for i, dist in enumerate(dists):
        try:
            v = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return v if i == 0 else f"{v} ({dist})"
    return "absent"


# A study writes its records inside the checkout (results/default is committed): outputs
# are not code, so they never make the checkout dirty.
_OUTPUTS = (":(exclude,top)results", ":(exclude,top)paper_figures", ":(exclude,top)data")


def git_state(directory: str | os.PathLike) -> dict[str, Any]:
    """{"git_commit", "git_dirty"} of the checkout containing `directory`, else "unknown".

    Dirty means `git status --porcelain` lists anything outside the study outputs (modified,
    staged or untracked and not ignored): any of them may change what ran.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True,
                              text=True, check=True, timeout=60).stdout
    try:
        return {"git_commit": git("rev-parse", "HEAD").strip(),
                "git_dirty": bool(git("status", "--porcelain", "--", ".", *_OUTPUTS).strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def _cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _build_line(key: str, pattern: str) -> dict[str, str]:
    """{key: the first match of `pattern` in torch's build description} ("unknown" if none)."""
    m = re.search(pattern, torch.__config__.show())
    return {key: m.group(1) if m else "unknown"}


def numerics() -> dict[str, Any]:
    """What decides a run's rounding (docs/protocol.md rule 5): the CPU kernels torch
    dispatches to (AVX2, AVX-512), threads, the BLAS and oneDNN builds, the env overrides;
    on GPUs CUDA, cuDNN and the determinism flags. Two machines that differ here may end a
    chaotic run elsewhere."""
    out: dict[str, Any] = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available(),
        **_build_line("onednn", r"MKL-DNN (v[\d.]+)"), **_build_line("mkl_version", r"Math Kernel Library Version ([\d.]+)"),
        **_build_line("blas", r"BLAS_INFO=([^,]+)"),
        "env": {k: os.environ[k] for k in (*NUMERICS_ENV, "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
                                           "CUBLAS_WORKSPACE_CONFIG") if k in os.environ},
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if torch.cuda.is_available():
        out |= {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "cudnn_deterministic": torch.backends.cudnn.deterministic,
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    return out


def provenance(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Code version, package versions and hardware, to store beside a run's metrics
    (docs/protocol.md, rule 12).

    `extra` (config, seed, subset manifest hash, ...) is merged in; a key clashing with a
    provenance key raises ValueError rather than silently replacing it.
    """
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    out: dict[str, Any] = {
        **git_state(Path(__file__).resolve().parent),
        "python": platform.python_version(),
        **{k: _version(v) for k, v in _PACKAGES.items()},
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu_count": len(gpus),
        "gpu_names": gpus,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "numerics": numerics(),
        "world_size": _world_size(),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    clash = set(out) & set(extra or {})
    if clash:
        raise ValueError(f"provenance: extra keys {sorted(clash)} clash with provenance keys")
    out.update(extra or {})
    return out



def progress_enabled() -> bool:
    """Progress bars only for a person watching: not in CI, not when stdout is a file/pipe."""
    return not os.environ.get("CI") and sys.stdout.isatty()


def set_quiet_env() -> None:
    """Silence codecarbon (its INFO lines drown training logs) and, where no one watches,
    every tqdm bar in this process and its children (tqdm reads TQDM_DISABLE).

    Values the user already set are kept, so CODECARBON_LOG_LEVEL=debug still works.
    """
    os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")
    if not progress_enabled():
        os.environ.setdefault("TQDM_DISABLE", "1")
