"""Give a job its own GPUs on a machine where Snakemake runs several jobs at once.

Snakemake counts `gpu` resources but does not say which device a job may use. `run_on_gpus`
claims N free devices with exclusive file locks (released when the job's process ends,
even if it is killed), sets CUDA_VISIBLE_DEVICES and runs the command. Where a scheduler
already chose the devices (SLURM sets CUDA_VISIBLE_DEVICES) or N = 0, it runs the command
as it is.

A command that starts with the word `dbp` is launched for N, when the job runs: one plain
process for N <= 1, torchrun (DDP, one process per GPU) for N > 1. So the workflow's rules
pass their `gpu` resource, whatever a profile set it to, and nothing is probed when the
DAG is parsed (a SLURM login node has no GPU).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dbp.interrupt import STOP_SIGNALS


def device_count() -> int:
    """GPUs on this machine, from nvidia-smi (no CUDA context is created)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return len(out.stdout.split()) if out.returncode == 0 else 0


def claim(n: int, total: int, lock_dir: Path, poll: float = 2.0) -> tuple[list[int], list]:
    """Block until n of `total` devices are free; return their ids and the held locks."""
    if n > total:
        raise RuntimeError(f"the job needs {n} GPU(s) but this machine has {total} (nvidia-smi); "
                           f"run it with --set-resources RULE:gpu={total}, or on a GPU machine")
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        held = []
        for i in range(total):
            f = open(lock_dir / f"gpu{i}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append((i, f))
            except BlockingIOError:
                f.close()
            if len(held) == n:
                return [i for i, _ in held], [f for _, f in held]
        for _, f in held:
            f.close()
        time.sleep(poll)


def dbp_launcher(n: int, python: str = sys.executable) -> list[str]:
    """The command that runs `dbp` on n GPUs: this Python's `-m dbp`, under torchrun with
    n processes when n > 1."""
    if n <= 1:
        return [python, "-m", "dbp"]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "-m", "dbp"]


def run_on_gpus(n: int, cmd: list[str], lock_dir: Path = Path("/tmp/dbp-gpu-locks")) -> int:
    """Run `cmd` on n claimed GPUs (or as is; see the module docstring); its exit code."""
    if n < 0:
        raise ValueError(f"GPUs per job must be >= 0, got {n}")
    if cmd[:1] == ["dbp"]:
        cmd = dbp_launcher(n) + cmd[1:]
    if n == 0 or "CUDA_VISIBLE_DEVICES" in os.environ:
        return call_forwarding(cmd)
    ids, locks = claim(n, device_count(), lock_dir)
    try:
        return call_forwarding(cmd, {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))})
    finally:
        for f in locks:
            f.close()


def call_forwarding(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run `cmd` and wait for it, passing SIGTERM and SIGINT on to it (a training run saves
    and stops; dbp.interrupt) instead of dying and leaving it running on, orphaned. The exit
    code is the command's, 128 + N for a command killed by signal N (as a shell says)."""
    child = subprocess.Popen(cmd, env=env)
    old = {s: signal.signal(s, lambda signum, _: child.send_signal(signum)) for s in STOP_SIGNALS}
    try:
        code = child.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return code if code >= 0 else 128 - code
