"""The protocol's training clock (docs/protocol.md, timing): training time, with validation,
logging and checkpointing accumulated separately, the device synchronised before every read,
the process CPU time of training beside it (contention), and the energy meters run exactly
while the training clock runs."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

TRAIN = "train"


class Clock:
    """The protocol's training clock (docs/protocol.md, rule 3).

    Time is charged to the innermost open span: `train()` or `excluded(kind)`. So an
    `excluded("eval")` inside `train()` pauses the training clock for its duration, and the
    gaps outside every span are charged to nothing. The device is synchronised before every
    clock read, so queued GPU work is charged to the span that queued it.

    With a `meter` (an EnergyMeter, an NvmlEnergy, or a list of them), each runs exactly
    while `train` is the innermost span; their start/stop overhead is charged to the
    excluded bucket "energy".

    `cpu_seconds` is the process CPU time (time.process_time: every thread of this process,
    not DataLoader worker processes) charged to `train` the same way: against wall time it
    shows whether the run had its cores to itself (docs/protocol.md, rule 11).
    """

    def __init__(self, device: torch.device | str, meter: Any = None):
        self.device = torch.device(device)
        self.meters = [m for m in (meter if isinstance(meter, (list, tuple)) else [meter]) if m is not None]
        self._train = 0.0
        self._cpu = 0.0
        self._excluded: dict[str, float] = {}
        self._stack: list[str] = []
        self._last = 0.0
        self._cpu_last = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _charge(self, owner: str, seconds: float) -> None:
        if owner == TRAIN:
            self._train += seconds
        else:
            self._excluded[owner] = self._excluded.get(owner, 0.0) + seconds

    def _switch(self, push: str | None) -> None:
        """Close the current owner's span, then push `push` (or pop when None)."""
        self._sync()
        now, cpu = time.perf_counter(), time.process_time()
        before = self._stack[-1] if self._stack else None
        if before is not None:
            self._charge(before, now - self._last)
        if before == TRAIN:
            self._cpu += cpu - self._cpu_last
        if push is None:
            self._stack.pop()
        else:
            self._stack.append(push)
        after = self._stack[-1] if self._stack else None
        self._last, self._cpu_last = now, cpu
        if self.meters and (before == TRAIN) != (after == TRAIN):
            for m in self.meters:
                m.start() if after == TRAIN else m.stop()
            self._last, self._cpu_last = time.perf_counter(), time.process_time()
            self._charge("energy", self._last - now)

    @contextmanager
    def train(self) -> Iterator[None]:
        """Charge the enclosed span to training time."""
        self._switch(TRAIN)
        try:
            yield
        finally:
            self._switch(None)

    @contextmanager
    def excluded(self, kind: str) -> Iterator[None]:
        """Charge the enclosed span to the excluded bucket `kind` (eval, log, checkpoint, ...)."""
        if kind == TRAIN:
            raise ValueError("excluded() needs a bucket name other than 'train'")
        self._switch(kind)
        try:
            yield
        finally:
            self._switch(None)

    def _live(self, owner: str) -> float:
        """Seconds of the still-open span if `owner` holds the clock now (no device sync)."""
        return time.perf_counter() - self._last if self._stack and self._stack[-1] == owner else 0.0

    @property
    def train_seconds(self) -> float:
        return self._train + self._live(TRAIN)

    @property
    def cpu_seconds(self) -> float:
        """Process CPU seconds charged to training (live, like train_seconds)."""
        training = bool(self._stack) and self._stack[-1] == TRAIN
        return self._cpu + (time.process_time() - self._cpu_last if training else 0.0)

    @property
    def excluded_seconds(self) -> dict[str, float]:
        out = dict(self._excluded)
        if self._stack and self._stack[-1] != TRAIN:
            out[self._stack[-1]] = out.get(self._stack[-1], 0.0) + self._live(self._stack[-1])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds, "cpu_seconds": self.cpu_seconds,
                "excluded_seconds": self.excluded_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the totals of a previous run (call before any span is open)."""
        if self._stack:
            raise RuntimeError("Clock.load_state_dict inside an open span")
        self._train = float(state["train_seconds"])
        self._cpu = float(state.get("cpu_seconds", math.nan))  # older states: unknown, not 0
        self._excluded = {k: float(v) for k, v in state["excluded_seconds"].items()}
