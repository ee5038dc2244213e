"""Measurement helpers: atomic writes, the training clock, energy, provenance, quiet output."""
import json
import os
import re
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dbp import clock as clock_module
from dbp import records
from dbp.clock import Clock
from dbp.energy import EnergyMeter, NvmlEnergy, summed_over_ranks
from dbp.provenance import git_state, progress_enabled, provenance, set_quiet_env
from dbp.records import atomic_torch_save, atomic_write_json, atomic_write_text

J_PER_KWH = 3.6e6


# ----------------------------------------------------------------------------- helpers

class FakeTime:
    """A perf_counter that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_time(monkeypatch):
    ft = FakeTime()
    monkeypatch.setattr(clock_module.time, "perf_counter", ft)
    return ft


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def fake_tracker_class(fail_on: int | None = None, failure: str = "raise"):
    """A stand-in for codecarbon.OfflineEmissionsTracker: every task is 1 Wh CPU + 2 Wh RAM;
    the `fail_on`-th stop_task fails by raising, returning None, or returning NaN energy."""

    class FakeTracker:
        instances: list = []

        def __init__(self, **kwargs):
            self.kwargs, self.stops, self._tasks = kwargs, 0, {}
            self._scheduler_monitor_power = types.SimpleNamespace(interval=1)  # codecarbon's
            FakeTracker.instances.append(self)

        def get_detected_hardware(self):
            return {}

        def start_task(self, name):
            self._tasks[name] = "running"

        def stop_task(self, name):
            self.stops += 1
            if self.stops == fail_on:
                if failure == "raise":
                    raise OSError("psutil went away")
                if failure == "none":
                    return None
                return types.SimpleNamespace(cpu_energy=float("nan"), gpu_energy=0.0, ram_energy=0.0)
            return types.SimpleNamespace(cpu_energy=1e-3, gpu_energy=0.0, ram_energy=2e-3)

        def stop(self):
            pass

    return FakeTracker


# ----------------------------------------------------------------------------- atomic writes

def test_atomic_writes_round_trip_and_leave_no_temp_files(tmp_path):
    d = tmp_path / "new" / "dir"  # parents are created
    obj = {"z": 1, "a": np.float32(0.5), "n": np.int64(3), "arr": np.arange(3),
           "path": Path("/x/y"), "t": torch.tensor([1.5, 2.0]), "inf": float("inf")}
    atomic_write_json(d / "m.json", obj)
    atomic_write_text(d / "m.csv", "step,loss\n0,1.25\nh\u00e9\n")
    atomic_torch_save({"w": torch.arange(5.0), "step": 7}, d / "c.pt")

    back = json.loads((d / "m.json").read_text())
    assert back == {"z": 1, "a": 0.5, "n": 3, "arr": [0, 1, 2], "path": "/x/y", "t": [1.5, 2.0],
                    "inf": float("inf")}
    assert list(back) == list(obj)  # key order kept, not sorted
    assert (d / "m.json").read_text().startswith('{\n  "z": 1')  # indent 2
    assert (d / "m.csv").read_text(encoding="utf-8") == "step,loss\n0,1.25\nh\u00e9\n"
    ck = torch.load(d / "c.pt", weights_only=True)
    assert torch.equal(ck["w"], torch.arange(5.0)) and ck["step"] == 7
    assert sorted(os.listdir(d)) == ["c.pt", "m.csv", "m.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (d / "m.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_overwrite_replaces_the_whole_file(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "x" * 10_000)
    atomic_write_text(p, "short")
    assert p.read_text() == "short"
    atomic_write_json(p, [1, 2])
    assert json.loads(p.read_text()) == [1, 2]
    atomic_torch_save({"a": torch.ones(1000)}, p)
    atomic_torch_save({"b": torch.zeros(2)}, p)
    assert list(torch.load(p, weights_only=True)) == ["b"]
    assert os.listdir(tmp_path) == ["f.txt"]


def _fail_json(p, monkeypatch):
    atomic_write_json(p, {"ok": 1, "bad": object()})


def _fail_torch(p, monkeypatch):
    atomic_torch_save({"w": torch.zeros(100_000), "f": lambda: 0}, p)  # unpicklable after data


def _fail_text_at_fsync(p, monkeypatch):
    def broken_fsync(fd):
        raise OSError("disk full")
    monkeypatch.setattr(records.os, "fsync", broken_fsync)
    atomic_write_text(p, "new content")


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("fail", [_fail_json, _fail_torch, _fail_text_at_fsync])
def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch, fail, existing):
    p = tmp_path / "target"
    if existing:
        p.write_text("old")
    with pytest.raises(Exception):
        fail(p, monkeypatch)
    assert os.listdir(tmp_path) == (["target"] if existing else [])  # no stray temp file
    if existing:
        assert p.read_text() == "old"


# ----------------------------------------------------------------------------- clock

def test_clock_charges_the_innermost_span_exactly(fake_time):
    clock = Clock("cpu")
    with clock.train():
        fake_time.advance(10)
        with clock.excluded("eval"):  # validation inside the loop: train clock paused
            fake_time.advance(3)
            with clock.excluded("log"):
                fake_time.advance(0.5)
            fake_time.advance(1)
        fake_time.advance(2)
        assert clock.train_seconds == pytest.approx(12, abs=1e-9)  # live, mid-span
    fake_time.advance(50)  # outside every span: charged to nothing
    with clock.excluded("checkpoint"):
        fake_time.advance(4)
    with clock.train():
        fake_time.advance(1)
    assert clock.train_seconds == pytest.approx(13, abs=1e-9)
    assert clock.excluded_seconds == pytest.approx({"eval": 4, "log": 0.5, "checkpoint": 4}, abs=1e-9)


def test_clock_state_round_trip_continues_totals(fake_time):
    clock = Clock("cpu")
    with clock.train():
        fake_time.advance(6)
    with clock.excluded("eval"):
        fake_time.advance(2)
    state = json.loads(json.dumps(clock.state_dict()))  # stored in checkpoints / JSON

    resumed = Clock("cpu")
    resumed.load_state_dict(state)
    with resumed.train():
        fake_time.advance(4)
        with resumed.excluded("eval"):
            fake_time.advance(1)
            with pytest.raises(RuntimeError):
                resumed.load_state_dict(state)
    assert resumed.train_seconds == pytest.approx(10, abs=1e-9)
    assert resumed.excluded_seconds == pytest.approx({"eval": 3}, abs=1e-9)
    with pytest.raises(ValueError):
        with resumed.excluded("train"):
            pass


def test_clock_charges_process_cpu_time_to_training_only(fake_time, monkeypatch):
    cpu = FakeTime()
    monkeypatch.setattr(clock_module.time, "process_time", cpu)
    clock = Clock("cpu")
    cpu.advance(7)  # before any span: charged to nothing
    with clock.train():
        cpu.advance(3)  # e.g. 1.5 s of wall time on 2 busy threads
        with clock.excluded("eval"):
            cpu.advance(5)
        cpu.advance(1)
        assert clock.cpu_seconds == pytest.approx(4, abs=1e-9)  # live, mid-span
    with clock.excluded("checkpoint"):
        cpu.advance(2)
    assert clock.cpu_seconds == pytest.approx(4, abs=1e-9)
    state = json.loads(json.dumps(clock.state_dict()))
    assert state["cpu_seconds"] == pytest.approx(4, abs=1e-9)

    resumed = Clock("cpu")
    resumed.load_state_dict(state)
    with resumed.train():
        cpu.advance(2)
    assert resumed.cpu_seconds == pytest.approx(6, abs=1e-9)
    old = Clock("cpu")  # a state saved before CPU time was recorded: unknown, not zero
    old.load_state_dict({"train_seconds": 1.0, "excluded_seconds": {}})
    assert np.isnan(old.cpu_seconds)


def test_clock_synchronises_the_device_before_every_read(monkeypatch):
    events = []
    monkeypatch.setattr(clock_module.time, "perf_counter", lambda: events.append("read") or float(len(events)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"sync {device}"))
    clock = Clock("cuda:1")
    with clock.train():
        with clock.excluded("eval"):
            pass
    assert events == ["sync cuda:1", "read"] * 4
    events.clear()
    with Clock("cpu").train():
        pass
    assert events == ["read", "read"]


def test_clock_runs_the_meter_exactly_while_training(fake_time, monkeypatch):
    """Energy seconds == train seconds; the meter's start/stop cost goes to the 'energy' bucket."""
    import codecarbon
    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", fake_tracker_class())
    meter = EnergyMeter(carbon_intensity_g_per_kwh=100.0)
    slow_start, slow_stop = meter.start, meter.stop
    # codecarbon's start_task/stop_task cost, before the meter's own clock read / after it
    monkeypatch.setattr(meter, "start", lambda: (fake_time.advance(0.25), slow_start()))
    monkeypatch.setattr(meter, "stop", lambda: (slow_stop(), fake_time.advance(0.25)))
    clock = Clock("cpu", meter=meter)
    with clock.excluded("eval"):  # outside training: the meter stays off
        fake_time.advance(5)
    assert not meter.running
    with clock.train():
        assert meter.running
        fake_time.advance(7)
        with clock.excluded("eval"):
            assert not meter.running
            fake_time.advance(3)
        fake_time.advance(2)
    assert not meter.running
    t = meter.totals()
    assert clock.train_seconds == pytest.approx(9, abs=1e-9)
    assert clock.excluded_seconds == pytest.approx({"eval": 8, "energy": 1.0}, abs=1e-9)
    assert t["seconds"] == pytest.approx(9, abs=1e-9)
    assert t["energy_kwh"] == pytest.approx(2 * 3e-3)  # two segments, one task each


# ----------------------------------------------------------------------------- energy

def test_energy_meter_with_real_codecarbon():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning, no codecarbon deprecation
        meter = EnergyMeter(country_iso_code="NLD")
        meter.start()
        busy(0.6)
        meter.stop()
        busy(1.0)  # between segments: must not be counted
        meter.start()
        busy(0.6)
        meter.stop()
        gapped = meter.totals()
        meter.start()
        busy(1.2)
        meter.stop()
    t = meter.totals()
    import codecarbon  # the installed version and what it set up, not a pinned string
    assert t["method"].startswith(f"codecarbon {codecarbon.__version__} task API, "
                                  "tracking_mode=process: CPU ")
    assert "; RAM estimated (codecarbon power model, this process tree's memory)" in t["method"]
    assert ("GPU none detected (0 kWh)" in t["method"]) == (t["gpu_kwh"] == 0)
    assert 1.2 <= gapped["seconds"] < 1.5 and gapped["measured_seconds"] == gapped["seconds"]
    assert t["energy_kwh"] > 0 and t["co2_kg"] > 0 and t["fallback_kwh"] == 0
    assert t["energy_kwh"] == pytest.approx(t["cpu_kwh"] + t["gpu_kwh"] + t["ram_kwh"], rel=1e-12)
    assert t["co2_kg"] / t["energy_kwh"] * 1000 == pytest.approx(t["carbon_intensity_g_per_kwh"], rel=1e-6)
    assert t["carbon_intensity_source"].startswith("codecarbon global_energy_mix NLD")
    # the gap is excluded: mean power of the gapped segments matches the continuous one
    # (counting the 1 s gap would make it ~1.8x)
    watts_gapped = gapped["energy_kwh"] * J_PER_KWH / gapped["seconds"]
    watts_cont = ((t["energy_kwh"] - gapped["energy_kwh"]) * J_PER_KWH
                  / (t["seconds"] - gapped["seconds"]))
    assert 0.7 < watts_gapped / watts_cont < 1.3
    # the declared intensity is the one codecarbon's own tracker applies
    import codecarbon
    tracker = codecarbon.OfflineEmissionsTracker(country_iso_code="NLD", tracking_mode="process",
                                                 output_methods=[], log_level="error")
    tracker.start_task("check")
    busy(0.1)
    d = tracker.stop_task("check")
    assert d.emissions / d.energy_consumed * 1000 == pytest.approx(t["carbon_intensity_g_per_kwh"], rel=1e-6)


def test_measure_power_secs_paces_codecarbons_task_monitor():
    """Issue 11, fault 7: energy.measure_power_secs did nothing (codecarbon's task mode samples
    on its own 1 s monitor thread); it now sets that thread's interval."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no "is ignored" warning
        meter = EnergyMeter(country_iso_code="NLD", measure_power_secs=0.25)
    assert meter._tracker._scheduler_monitor_power.interval == 0.25
    meter.start()
    busy(0.6)  # samples at 0.25 s: the monitor has run in the segment
    meter.stop()
    assert meter.totals()["measured_seconds"] > 0.5


def test_energy_meter_falls_back_when_the_tracker_cannot_be_built(fake_time, monkeypatch):
    import codecarbon

    def broken(**kwargs):
        raise RuntimeError("no hardware access")
    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", broken)
    with pytest.warns(RuntimeWarning, match="no hardware access"):
        meter = EnergyMeter(fallback_watts=20.0, carbon_intensity_g_per_kwh=300.0)
    for seconds in (60, 30):
        meter.start()
        fake_time.advance(seconds)
        meter.stop()
    t = meter.totals()
    assert t["method"].startswith("fallback: constant power 20 W for 90.0 s of 90.0 s")
    assert "no hardware access" in t["method"]
    assert t["energy_kwh"] == pytest.approx(90 * 20 / J_PER_KWH, rel=0.05)
    assert t["fallback_kwh"] == t["energy_kwh"] and t["cpu_kwh"] == 0
    assert t["co2_kg"] == pytest.approx(t["energy_kwh"] * 0.3, rel=1e-12)


@pytest.mark.parametrize("failure", ["raise", "none", "nan"])
def test_energy_meter_failing_mid_run_warns_once_and_estimates_the_rest(fake_time, monkeypatch, failure):
    import codecarbon
    cls = fake_tracker_class(fail_on=2, failure=failure)
    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", cls)
    meter = EnergyMeter(country_iso_code="DEU", measure_power_secs=5, fallback_watts=36.0,
                        carbon_intensity_g_per_kwh=400.0, output_dir="/tmp/run")
    tracker = cls.instances[-1]
    assert tracker.kwargs == dict(country_iso_code="DEU", measure_power_secs=5, tracking_mode="process",
                                  output_methods=[], log_level="error", output_dir="/tmp/run")
    assert tracker._scheduler_monitor_power.interval == 5  # task mode samples at this pace
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seconds in (10, 20, 30):  # measured; fails; never asks codecarbon again
            meter.start()
            fake_time.advance(seconds)
            meter.stop()
    assert "segment-1" not in tracker._tasks  # finished tasks are not kept by codecarbon
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert tracker.stops == 2
    t = meter.totals()
    assert t["cpu_kwh"] == pytest.approx(1e-3) and t["ram_kwh"] == pytest.approx(2e-3)
    assert t["fallback_kwh"] == pytest.approx(50 * 36 / J_PER_KWH)
    assert t["energy_kwh"] == pytest.approx(3e-3 + 50 * 36 / J_PER_KWH)
    assert t["measured_seconds"] == 10 and t["fallback_seconds"] == 50
    assert t["method"].startswith("fallback: constant power 36 W for 50.0 s of 60.0 s")
    assert "the other 10.0 s: codecarbon" in t["method"]


def test_disabled_meter_reports_zeros():
    meter = EnergyMeter(enabled=False)
    meter.start()
    busy(0.05)
    meter.stop()
    t = meter.totals()
    assert t["method"] == "disabled"
    assert all(v == 0 for k, v in t.items() if isinstance(v, float))
    meter.load_state_dict({})  # ignored


def test_energy_meter_state_round_trip_continues_totals(fake_time, monkeypatch):
    import codecarbon
    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", fake_tracker_class())
    first = EnergyMeter(carbon_intensity_g_per_kwh=250.0)
    first.start()
    fake_time.advance(8)
    first.stop()
    state = json.loads(json.dumps(first.state_dict()))

    resumed = EnergyMeter(carbon_intensity_g_per_kwh=250.0)
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.start()
        fake_time.advance(8)
        resumed.stop()
    t = resumed.totals()
    assert t["seconds"] == pytest.approx(24) and t["measured_seconds"] == pytest.approx(24)
    assert t["energy_kwh"] == pytest.approx(3 * 3e-3)
    assert t["co2_kg"] == pytest.approx(3 * 3e-3 * 0.25)
    assert t["method"] == first.totals()["method"]

    with pytest.warns(RuntimeWarning, match="gCO2e/kWh"):
        EnergyMeter(carbon_intensity_g_per_kwh=100.0).load_state_dict(state)


# ----------------------------------------------------------------------------- provenance

def test_provenance_has_the_documented_keys(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    p = provenance({"seed": 3, "manifest_hash": "abc"})
    assert set(p) == {"git_commit", "git_dirty", "python", "torch", "torchvision", "timm", "mmseg",
                      "mmengine", "mmcv", "codecarbon", "numpy", "hostname", "platform",
                      "cpu_model", "cpu_count", "gpu_count", "gpu_names", "torch_cuda",
                      "torch_threads", "numerics", "world_size", "timestamp_utc", "seed", "manifest_hash"}
    assert re.fullmatch(r"[0-9a-f]{40}", p["git_commit"])  # this repo is a git checkout
    assert isinstance(p["git_dirty"], bool)
    assert p["torch"] == torch.__version__ and p["numpy"] == np.__version__
    assert p["python"] == ".".join(map(str, sys.version_info[:3]))
    assert p["world_size"] == 4 and p["gpu_count"] == len(p["gpu_names"])
    assert p["cpu_count"] == os.cpu_count() and p["cpu_model"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", p["timestamp_utc"])
    json.dumps(p)
    with pytest.raises(ValueError, match="hostname"):
        provenance({"hostname": "elsewhere"})


def test_git_state_outside_a_checkout(tmp_path):
    assert git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}


def test_numerics_record_the_kernel_set_and_the_switches_that_chose_it():
    """What decides a run's rounding (docs/protocol.md rule 14): ATen's kernel set follows
    ATEN_CPU_CAPABILITY, and the switches are recorded beside it."""
    code = ("import json; from dbp.provenance import numerics; print(json.dumps(numerics()))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    n = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                  text=True, env=env, timeout=120).stdout)
    assert n["cpu_capability"] == "DEFAULT" and n["threads"] >= 1
    assert n["env"]["ATEN_CPU_CAPABILITY"] == "default" and n["env"]["MKL_ENABLE_INSTRUCTIONS"] == "SSE4_2"
    assert n["mkl_version"] != "" and n["onednn"].startswith("v") and n["float32_matmul_precision"] == "highest"
    assert "cudnn" not in n  # CPU only here; on CUDA: cuda, cudnn, tf32 and determinism flags


def test_provenance_imports_neither_timm_nor_mmseg():
    code = ("import sys; from dbp.provenance import provenance; v = provenance(); "
            "assert not {'timm', 'mmseg', 'codecarbon'} & set(sys.modules), sorted(sys.modules); "
            "assert v['timm'] != 'absent'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- quiet output

def _unset(monkeypatch, *names):
    for name in names:  # setenv first so that monkeypatch restores the original state
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)


@pytest.mark.parametrize("ci,tty,expected", [(None, True, True), ("true", True, False),
                                             (None, False, False)])
def test_progress_enabled_only_for_a_watched_terminal(monkeypatch, ci, tty, expected):
    _unset(monkeypatch, "CI")
    if ci:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(isatty=lambda: tty))
    assert progress_enabled() is expected


def test_set_quiet_env(monkeypatch):
    _unset(monkeypatch, "CODECARBON_LOG_LEVEL", "TQDM_DISABLE")
    monkeypatch.setenv("CI", "true")
    set_quiet_env()
    assert os.environ["CODECARBON_LOG_LEVEL"] == "error" and os.environ["TQDM_DISABLE"] == "1"
    monkeypatch.setenv("CODECARBON_LOG_LEVEL", "debug")  # a user's choice is kept
    set_quiet_env()
    assert os.environ["CODECARBON_LOG_LEVEL"] == "debug"


def test_nvml_energy_counts_exactly_the_timed_spans():
    readings = iter([1_000, 3_601_000, 5_000_000, 8_600_000])  # mJ: two spans of 3.6e6 mJ
    gpu = NvmlEnergy(lambda: next(readings), "fake GPU")
    clock = Clock("cpu", meter=[None, gpu])
    with clock.train():
        pass
    with clock.excluded("eval"):  # not read: the counter's 1.4e6 mJ in between are not charged
        pass
    with clock.train():
        pass
    assert gpu.kwh == pytest.approx(2 * 3.6e6 / 3.6e9)
    resumed = NvmlEnergy(lambda: 0, "fake GPU")
    resumed.load_state_dict(gpu.state_dict())
    assert resumed.kwh == gpu.kwh
    assert NvmlEnergy.for_device(torch.device("cpu")) is None
    assert summed_over_ranks(2.5, torch.device("cpu")) == 2.5  # one process: itself
