"""Measurement helpers shared by the pre-training and fine-tuning engines.

- atomic writes, so a killed run never leaves a truncated metrics file or checkpoint;
- `Clock`, the protocol's training clock (docs/protocol.md, rule 3): training time, with
  validation, logging and checkpointing accumulated separately, the device synchronised before
  every read, and the process CPU time of training (rule 11, contention);
- `EnergyMeter`, codecarbon over exactly the timed region (docs/protocol.md, rule 10), never
  able to crash training;
- `provenance()`, code version, package versions and hardware beside every result
  (docs/protocol.md, rule 12);
- `set_quiet_env()` / `progress_enabled()`, quiet logs in CI and batch jobs.
"""
from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dbp.records import atomic_write, atomic_write_json, atomic_write_text  # noqa: F401

# ----------------------------------------------------------------------------- atomic writes
# The torch-free writers live in dbp.records (the results side uses them without torch).

def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` atomically: a crash mid-save never corrupts the last checkpoint."""
    atomic_write(path, "wb", lambda f: torch.save(obj, f))


# ----------------------------------------------------------------------------- clock

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


# ----------------------------------------------------------------------------- energy

# codecarbon's own estimate for this project's 2-core CPU machine at full load, used only if
# codecarbon fails: 8 W CPU (4 W per thread x 2, its default for an unknown CPU) + 10 W RAM
# (its minimum, 2 DIMMs x 5 W). Override per machine with `fallback_watts`.
DEFAULT_FALLBACK_WATTS = 18.0
# codecarbon's world average (IEA 2019), used when its bundled data cannot be read.
WORLD_AVERAGE_G_PER_KWH = 475.0
_J_PER_KWH = 3.6e6
# CPU modes of codecarbon's CPU object that read hardware energy/power counters.
_MEASURED_CPU_MODES = {"intel_rapl": "RAPL", "windows_emi": "Windows EMI",
                       "intel_power_gadget": "Intel Power Gadget"}


def carbon_intensity(country_iso_code: str) -> tuple[float, str]:
    """(gCO2e/kWh, source) for a country from codecarbon's bundled data, offline.

    Uses codecarbon's own conversion (Emissions.get_country_emissions), so the value is the
    one its tracker would apply; a country missing from the data gets the world average.
    """
    try:
        os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")  # read at codecarbon's import
        from codecarbon.core.emissions import Emissions
        from codecarbon.core.units import Energy
        from codecarbon.external.geography import GeoMetadata
        from codecarbon.input import DataSource

        iso = country_iso_code.upper()
        data = DataSource()
        kg = Emissions(data).get_country_emissions(Energy.from_energy(kWh=1.0),
                                                   GeoMetadata(country_iso_code=iso))
        mix = data.get_global_energy_mix_data().get(iso)
        if mix is None:
            return kg * 1000.0, f"codecarbon world average (no data for {iso})"
        return kg * 1000.0, f"codecarbon global_energy_mix {iso} ({mix.get('year', 'year n/a')})"
    except Exception as e:  # noqa: BLE001 - any codecarbon problem: declared constant instead
        return WORLD_AVERAGE_G_PER_KWH, f"constant world average (codecarbon data unavailable: {e!r})"


def _describe_tracker(tracker: Any, version: str) -> str:
    """What codecarbon measures and what it estimates, from the hardware objects it set up.

    codecarbon 3.3.2 discards its ResourceTracker (whose cpu_tracker/gpu_tracker strings say
    the mode), so this reads the tracker's `_hardware` list: each CPU object's `_mode` and
    `_tdp`, and which of RAM/GPU objects exist (RAM is always a model estimate).
    """
    mode = getattr(tracker, "_tracking_mode", "?")
    share = "this process tree's" if mode == "process" else "the machine's"
    parts: dict[str, str] = {}
    for hw in getattr(tracker, "_hardware", []):
        kind = type(hw).__name__
        if kind == "CPU":
            cpu_mode, tdp = getattr(hw, "_mode", "?"), getattr(hw, "_tdp", "?")
            if cpu_mode in _MEASURED_CPU_MODES:
                parts["CPU"] = f"measured ({_MEASURED_CPU_MODES[cpu_mode]})"
            elif cpu_mode == "cpu_load":
                parts["CPU"] = f"estimated ({tdp} W TDP x {share} CPU load)"
            else:
                parts["CPU"] = f"estimated ({cpu_mode}, {tdp} W TDP)"
        elif kind == "GPU":
            parts["GPU"] = "measured (NVML/AMD SMI, whole devices)"
        elif kind == "RAM":
            parts["RAM"] = f"estimated (codecarbon power model, {share} memory)"
        else:  # AppleSiliconChip / Raspberry: on-chip or PMIC power readings
            parts[getattr(hw, "chip_part", kind)] = f"measured ({hw.description()})"
    order = ["CPU", "GPU", "RAM", *sorted(set(parts) - {"CPU", "GPU", "RAM"})]
    body = "; ".join(f"{k} {parts.get(k, 'none detected (0 kWh)')}" for k in order)
    return f"codecarbon {version} task API, tracking_mode={mode}: {body}"


def _pace_task_monitor(tracker: Any, seconds: float) -> None:
    """Sample power every `seconds` in codecarbon's task mode: its monitor thread (created
    with the tracker, started by each start_task) is otherwise fixed at 1 s, whatever
    measure_power_secs says. Warns (and keeps codecarbon's rate) if its internals moved."""
    monitor = getattr(tracker, "_scheduler_monitor_power", None)
    if monitor is None or not hasattr(monitor, "interval"):
        warnings.warn(f"EnergyMeter: codecarbon has no task-mode power monitor to pace; "
                      f"measure_power_secs={seconds:g} is ignored", RuntimeWarning, stacklevel=3)
        return
    monitor.interval = float(seconds)


class EnergyMeter:
    """codecarbon over exactly the timed region (docs/protocol.md, rule 10), which can never
    crash training.

    One OfflineEmissionsTracker for the whole run; each start()/stop() pair is one codecarbon
    task (start_task/stop_task). A task resets the hardware baselines at its start and its
    monitor thread stops at its end, so the paused spans (eval, checkpoints) are not counted,
    and a segment costs ~2-3 ms instead of a 0.4 s tracker start. In task mode codecarbon
    samples power on its monitor thread (fixed at 1 s in 3.3.2) and at every stop; the
    periodic scheduler that its own `measure_power_secs` paces is never started. So
    `measure_power_secs` here sets the monitor thread's interval (1 s = codecarbon's rate).

    CO2 = energy x one carbon intensity (`carbon_intensity_g_per_kwh`, default: codecarbon's
    bundled figure for `country_iso_code`). Any exception from codecarbon is reported once as a
    RuntimeWarning; from then on (and for the segment that failed) energy is estimated as
    seconds x `fallback_watts`, and `method` starts with "fallback". totals() covers completed
    segments only. `enabled=False` makes every call a no-op and totals() zeros.
    """

    def __init__(self, country_iso_code: str = "NLD", measure_power_secs: float = 1.0,
                 fallback_watts: float = DEFAULT_FALLBACK_WATTS,
                 carbon_intensity_g_per_kwh: float | None = None,
                 output_dir: str | os.PathLike | None = None, enabled: bool = True):
        self.enabled = enabled
        self.fallback_watts = float(fallback_watts)
        self._tracker: Any = None
        self._description = ""  # set once codecarbon is up
        self._failure: str | None = None
        self._t0: float | None = None
        self._task: str | None = None
        self._n = 0
        self._totals = dict(seconds=0.0, measured_seconds=0.0, fallback_seconds=0.0, cpu_kwh=0.0,
                            gpu_kwh=0.0, ram_kwh=0.0, fallback_kwh=0.0, co2_kg=0.0)
        self._descriptions: list[str] = []  # of the measured seconds, across resumes
        if carbon_intensity_g_per_kwh is None:
            self.intensity, self.intensity_source = (carbon_intensity(country_iso_code)
                                                     if enabled else (0.0, "disabled"))
        else:
            self.intensity = float(carbon_intensity_g_per_kwh)
            self.intensity_source = "declared constant"
        if not enabled:
            return
        try:
            os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")  # read at codecarbon's import
            import codecarbon

            self._tracker = codecarbon.OfflineEmissionsTracker(
                country_iso_code=country_iso_code, measure_power_secs=measure_power_secs,
                tracking_mode="process", output_methods=[], log_level="error",
                **({"output_dir": str(output_dir)} if output_dir is not None else {}))
            _pace_task_monitor(self._tracker, measure_power_secs)
            # codecarbon probes the hardware lazily (~1.5 s here, once per process); do it now,
            # outside any timed segment, and fail now rather than mid-run.
            self._tracker.get_detected_hardware()
            self._description = _describe_tracker(self._tracker, codecarbon.__version__)
        except Exception as e:  # noqa: BLE001 - energy must never crash training
            self._fail(e)

    def _fail(self, exc: BaseException) -> None:
        self._failure = f"{type(exc).__name__}: {exc}"
        tracker, self._tracker = self._tracker, None
        with suppress(Exception):  # best effort: stop codecarbon's monitor thread if it runs
            tracker.stop()
        warnings.warn(f"EnergyMeter: codecarbon failed ({self._failure}); estimating energy as "
                      f"{self.fallback_watts:g} W x seconds from now on", RuntimeWarning,
                      stacklevel=3)

    @property
    def running(self) -> bool:
        return self._t0 is not None

    def start(self) -> None:
        """Open a measured segment (no-op if disabled or already running)."""
        if not self.enabled or self.running:
            return
        if self._tracker is not None:
            self._n += 1
            try:
                self._tracker.start_task(f"segment-{self._n}")
                self._task = f"segment-{self._n}"
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        """Close the segment and add its energy (no-op if disabled or not running)."""
        if not self.enabled or not self.running:
            return
        seconds = time.perf_counter() - self._t0
        self._t0 = None
        task, self._task = self._task, None
        t = self._totals
        t["seconds"] += seconds
        kwh = None
        if task is not None and self._tracker is not None:
            try:
                data = self._tracker.stop_task(task)
                if data is None:
                    raise RuntimeError("stop_task returned no data (task was not running)")
                parts = {k: float(getattr(data, f"{k}_energy")) for k in ("cpu", "gpu", "ram")}
                if not all(math.isfinite(v) and v >= 0 for v in parts.values()):
                    raise RuntimeError(f"non-finite or negative energy {parts}")
                # codecarbon keeps every finished task in a dict; drop ours so that a long
                # run with thousands of segments does not grow without bound
                getattr(self._tracker, "_tasks", {}).pop(task, None)
            except Exception as e:  # noqa: BLE001
                self._fail(e)
            else:
                for k, v in parts.items():
                    t[f"{k}_kwh"] += v
                kwh = sum(parts.values())
                t["measured_seconds"] += seconds
                if self._description not in self._descriptions:
                    self._descriptions.append(self._description)
        if kwh is None:
            kwh = seconds * self.fallback_watts / _J_PER_KWH
            t["fallback_kwh"] += kwh
            t["fallback_seconds"] += seconds
        t["co2_kg"] += kwh * self.intensity / 1000.0

    @property
    def method(self) -> str:
        """What was measured vs estimated over the totals so far."""
        if not self.enabled:
            return "disabled"
        t = self._totals
        measured = " then ".join(self._descriptions) or self._description
        if t["fallback_seconds"] == 0 and self._failure is None:
            return measured
        fb = (f"fallback: constant power {self.fallback_watts:g} W for "
              f"{t['fallback_seconds']:.1f} s of {t['seconds']:.1f} s")
        if self._failure is not None:
            fb += f" (codecarbon failed: {self._failure})"
        if t["measured_seconds"] > 0:
            fb += f"; the other {t['measured_seconds']:.1f} s: {measured}"
        return fb

    def totals(self) -> dict[str, Any]:
        """energy_kwh = cpu + gpu + ram (measured) + fallback (estimated); co2_kg; method."""
        if not self.enabled:
            return dict(energy_kwh=0.0, co2_kg=0.0, cpu_kwh=0.0, gpu_kwh=0.0, ram_kwh=0.0,
                        fallback_kwh=0.0, seconds=0.0, measured_seconds=0.0,
                        fallback_seconds=0.0, carbon_intensity_g_per_kwh=0.0,
                        carbon_intensity_source="disabled", method="disabled")
        t = self._totals
        energy = t["cpu_kwh"] + t["gpu_kwh"] + t["ram_kwh"] + t["fallback_kwh"]
        return dict(energy_kwh=energy, **t, carbon_intensity_g_per_kwh=self.intensity,
                    carbon_intensity_source=self.intensity_source, method=self.method)

    def state_dict(self) -> dict[str, Any]:
        return {**self._totals, "descriptions": list(self._descriptions),
                "failure": self._failure, "carbon_intensity_g_per_kwh": self.intensity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a previous run's totals (no-op when disabled)."""
        if not self.enabled:
            return
        if self.running:
            raise RuntimeError("EnergyMeter.load_state_dict while a segment is running")
        self._totals = {k: float(state[k]) for k in self._totals}
        self._descriptions = list(state["descriptions"])
        self._failure = self._failure or state["failure"]
        if not math.isclose(state["carbon_intensity_g_per_kwh"], self.intensity, rel_tol=1e-9):
            warnings.warn(f"EnergyMeter: resumed totals used {state['carbon_intensity_g_per_kwh']}"
                          f" gCO2e/kWh, this run uses {self.intensity}", RuntimeWarning,
                          stacklevel=2)


class NvmlEnergy:
    """The GPU's own energy counter (NVML, millijoules since the driver loaded) read at the
    start and end of every timed span: a measurement (docs/protocol.md rule 10), unlike
    codecarbon's estimates. One per rank, for that rank's device; sum `kwh` over ranks.
    `for_device` gives None where there is no NVIDIA GPU or its counter is not supported."""

    def __init__(self, read_mj: Callable[[], int], name: str):
        self._read, self.name = read_mj, name
        self.kwh, self._t0 = 0.0, None

    @classmethod
    def for_device(cls, device: torch.device) -> NvmlEnergy | None:
        if device.type != "cuda":
            return None
        try:
            import pynvml
            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # noqa: E731
            read()  # raises where the counter is not supported (pre-Volta)
            return cls(read, f"NVML energy counter, {pynvml.nvmlDeviceGetName(handle)}")
        except Exception:  # noqa: BLE001 - no counter: energy stays modelled
            return None

    def start(self) -> None:
        self._t0 = self._read()

    def stop(self) -> None:
        if self._t0 is not None:
            self.kwh += (self._read() - self._t0) / 3.6e9
            self._t0 = None

    def state_dict(self) -> dict[str, float]:
        return {"kwh": self.kwh}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kwh = float(state.get("kwh", 0.0))


def summed_over_ranks(value: float, device: torch.device) -> float:
    """`value` summed over every rank (itself when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item())


# ----------------------------------------------------------------------------- provenance

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
        "world_size": _world_size(),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    clash = set(out) & set(extra or {})
    if clash:
        raise ValueError(f"provenance: extra keys {sorted(clash)} clash with provenance keys")
    out.update(extra or {})
    return out


# ----------------------------------------------------------------------------- quiet output

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
