"""Stop a long run cleanly when asked to, and never run two processes on one run folder.

SLURM sends SIGTERM before a time limit or a preemption (profiles/slurm asks for it minutes
early with --signal), a user presses Ctrl-C (SIGINT). `StopSignals` turns either into a
flag that the training loop reads between steps: the step in progress finishes, the run
writes its checkpoint and records, marks itself interrupted and raises `Interrupted`,
whose exit code (128 + the signal, as a shell reports a killed process) Snakemake and SLURM
count as a failure to retry. A repeated signal changes nothing: the run is already stopping
(SIGKILL stops it at once, and it resumes from its last checkpoint).

`RunLock` holds an exclusive lock on <run folder>/.lock for the life of the process
(released by the kernel even on SIGKILL): a second process on the same folder stops at once
with one line naming the first one's PID.
"""
from __future__ import annotations

import fcntl
import os
import signal
import sys
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """A run stopped on a signal after saving its state; `code` is the process exit code."""

    def __init__(self, signum: int, where: str) -> None:
        self.code = 128 + signum
        super().__init__(f"{where}: stopped by {signal.Signals(signum).name}, state saved; run "
                         f"the same command again to resume (exit {self.code})")


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGTERM and SIGINT set `stop.signum` instead of
    ending the process; the previous handlers come back on exit. In the main thread only
    (elsewhere, e.g. a test runner's worker thread, signals keep their handlers). A process
    forked inside the block inherits the handler and takes the signal's default action, as
    it would have without it (loader workers ignore the signals: `ignore_stop_signals`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}
        self._pid = os.getpid()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked loader worker: the default action, as without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum is None:
            print(f"[stop] {signal.Signals(signum).name}: finishing the step, then saving",
                  file=sys.stderr, flush=True)
        self.signum = self.signum or signum

    def __enter__(self) -> StopSignals:
        try:
            self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        except ValueError:  # not the main thread
            self._old = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def agreed(self, device, world: int) -> int:
        """The signal that asked the run to stop (0: none). Under DDP (`world` > 1) the ranks
        agree on it before every step, so that all of them stop after the same one."""
        if world == 1:
            return self.signum or 0
        import torch
        import torch.distributed as dist
        flag = torch.tensor(self.signum or 0, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader worker's init: SLURM signals every process of a job, and a worker killed by
    it makes PyTorch's SIGCHLD handler raise in the main thread wherever it is (mid-step,
    mid-save). Workers leave SIGTERM/SIGINT to the main process, which stops between steps;
    they end when their loader is closed (the caller must close it: `closing(micro_batches(...))`)
    or when the main process is gone."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class RunLock:
    """An exclusive lock on `folder`/.lock while the run works there (see module docstring);
    taken by the lead process only (`lead`: rank 0; the other ranks of a DDP run share it)."""

    def __init__(self, folder: Path, lead: bool = True) -> None:
        self.path = Path(folder) / ".lock"
        self.lead = lead
        self._file = None

    def __enter__(self) -> RunLock:
        if not self.lead:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunLocked(f"{self.path.parent}: another process (PID {holder}) is running in "
                            f"this folder; wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class RunLocked(RuntimeError):
    """A run folder another live process holds."""
