"""Energy over exactly the timed spans: `EnergyMeter` (codecarbon, an estimate on most machines:
"modelled"; never able to crash training) and `NvmlEnergy` (the GPU's own counter: "measured"),
summed over ranks (docs/protocol.md, energy)."""
from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import torch

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
