"""MAE pre-training of one arm for one seed: the loop, the clock, energy, checkpoints.

Read top to bottom: `pretrain()` builds data, model and optimizer, then alternates timed
training segments with excluded validation (and checkpoints) on a step schedule shared by
every arm. For a given seed every arm gets the same initial weights, batch order,
augmentation and masks (all derived from (seed, position), never from the global RNG), so
arms differ only in the method. Kill the process at any point and run it again: it resumes
from the last checkpoint and, on CPU, ends with exactly the metrics of an unbroken run. A
checkpoint made with a different config (its `run_digest`) is never resumed: the run starts
over (docs/protocol.md, rule 12).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from dbp import DBP
from dbp._compat import UnsafeCheckpointError, safe_load
from dbp.arms import get_arm
from dbp.config import DataConfig, DBPConfig, EnergyConfig, PretrainConfig, StudyConfig
from dbp.data import TrainData, prepare_pretrain_data
from dbp.clock import Clock
from dbp.energy import EnergyMeter, NvmlEnergy, summed_over_ranks
from dbp.interrupt import Interrupted, RunLock, StopSignals, ignore_stop_signals
from dbp.learner import Learner, setup_device
from dbp.model import fixed_mask_noise, mask_noise, step_macs
from dbp.correlation import InputCorrelationProbe
from dbp.provenance import progress_enabled, provenance
from dbp.records import atomic_torch_save, atomic_write_json, atomic_write_text

COLUMNS = ["step", "epoch", "images_seen", "train_seconds", "eval_seconds", "checkpoint_seconds",
           "train_loss", "val_loss", "energy_kwh", "co2_kg", "images_per_second", "lr",
           "decor_loss", "mean_abs_corr", "cpu_seconds", "cpu_util", "load_avg",
           "measured_kwh"]


def _seed_int(*keys: int) -> int:
    """A 63-bit seed from a tuple of keys (no collisions between (seed, position) pairs)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------- schedule

def learning_rate(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """Per-iteration linear warm-up then half-cosine to `floor` at `total` (MAE's recipe)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batches(data: TrainData, seed: int, start: int, batch: int, rank: int, world: int,
                  workers: int, pin: bool, num_patches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The images and mask noise of micro-batch m = `start`, `start` + 1, ..., forever.
    Close it when done (`contextlib.closing`): that shuts its loader workers down.

    Epoch e visits the subset in the order permutation(seed, e); every rank takes its slice
    of each global batch; the masks come from (seed, m, rank). Position m fixes everything,
    so a resumed run continues exactly.
    """
    per_epoch = len(data.train) // (batch * world)
    if per_epoch == 0:
        raise ValueError(f"the training subset ({len(data.train)} images) is smaller than one "
                         f"global batch ({batch} x {world} ranks)")
    m = start
    while True:
        epoch, pos = divmod(m, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(data.train))
        batches = [order[(b * world + rank) * batch:(b * world + rank + 1) * batch].tolist()
                   for b in range(pos, per_epoch)]
        data.train.set_epoch(epoch, seed)
        loader = iter(DataLoader(data.train, batch_sampler=batches, num_workers=workers, pin_memory=pin,
                                 persistent_workers=False, worker_init_fn=ignore_stop_signals))
        try:
            for imgs, _ in loader:
                gen = torch.Generator().manual_seed(_seed_int(seed, m, rank))
                yield imgs, mask_noise(imgs.shape[0], num_patches, gen)
                m += 1
        finally:
            _close_loader(loader)


def _close_loader(loader: Iterator) -> None:
    """Shut a DataLoader iterator's workers down now, as its __del__ would: an error keeps the
    iterator alive in its traceback until exit, and then its workers, which leave SIGTERM to
    the main process (dbp.interrupt.ignore_stop_signals), would hold the process open."""
    shutdown = getattr(loader, "_shutdown_workers", None)  # none for num_workers = 0
    if shutdown is not None:
        shutdown()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, data: TrainData, device, autocast_dtype, probe: InputCorrelationProbe,
             batch: int) -> dict[str, float]:
    """Mean loss over the fixed validation images with their fixed per-image masks, and the
    input correlation of the probed layers on the same images (identical for every arm)."""
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    loader = DataLoader(data.val, batch_size=batch, shuffle=False)
    with probe:
        for imgs, idx in loader:
            imgs = imgs.to(device, non_blocking=True)
            noise = fixed_mask_noise(idx, model.num_patches).to(device)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                loss, _, _ = model(imgs, noise)
            total += loss.double() * len(idx)
            count += len(idx)
    model.train()
    return {"val_loss": float(total) / count, **probe.result()}


# ----------------------------------------------------------------------------- records

def run_digest(resolved_config: dict, arm: str, seed: int, manifest_hash: str,
               world_size: int) -> str:
    """sha256 (hex) of everything that fixes a run's results: a checkpoint is resumed only
    by a run with the same digest (docs/protocol.md, rule 12)."""
    key = {"config": resolved_config, "arm": arm, "seed": seed, "manifest_hash": manifest_hash,
           "world_size": world_size}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _matching_checkpoint(out: Path, digest: str, device: torch.device, lead: bool) -> dict | None:
    """out/checkpoint.pt if this very config made it. Else (another config, no digest, an
    unreadable file) None, and the lead rank removes the old run's checkpoint, final model
    and metrics, so that nothing of it mixes into the new run."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return None
    try:
        state = safe_load(path, device, what="pre-training checkpoint")
        old = state.get("run_digest") or "none"
        why = f"was made with a different config (digest {old[:12]} != {digest[:12]})"
    except UnsafeCheckpointError:  # never unpickled, and kept for inspection
        raise
    except Exception as e:  # noqa: BLE001 - truncated, foreign or from older code: start over
        state, old, why = None, "unreadable", f"is unreadable, not a checkpoint or cut short ({type(e).__name__})"
    if old == digest:
        return state
    if lead:
        print(f"[pretrain] {path} {why}: starting over", flush=True)
        for name in ("checkpoint.pt", "final.pt", "metrics.csv"):
            (out / name).unlink(missing_ok=True)
    return None


def step_cost(learner: Learner) -> dict[str, float]:
    """run.json's cost model, so the results side never builds a model (rule 13): MACs of one
    BP step on the effective batch, and the arm's extra MACs: DBP's (the identity control,
    eta = 0, still does the work) plus its optimizer's matmuls (Muon's Newton-Schulz)."""
    d, model, batch = learner.dbp_cfg, learner.model, learner.effective_batch
    if d is None:
        bp, dbp_extra = step_macs(model, batch, [], 1.0, 1, True)
    else:
        bp, dbp_extra = step_macs(model, batch, d.patterns(), d.sample_frac, d.every, d.fused)
    opt_extra = learner.arm.optimizer_macs(learner.optimizers)
    return {"macs_per_step": bp, "extra_macs_per_step": dbp_extra + opt_extra,
            "dbp_macs_per_step": dbp_extra, "optimizer_macs_per_step": opt_extra}


def _load_avg() -> float:
    """The 1-minute load average; NaN where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return math.nan


def _segment_stats(images: int, wall: float, cpu: float) -> dict[str, float]:
    """Throughput and contention of one timed segment (rule 11), read before its validation;
    the rates are NaN for step 0, which has no segment."""
    def rate(x: float) -> float:
        return x / wall if wall > 0 else math.nan
    return {"images_per_second": rate(images), "cpu_util": rate(cpu), "load_avg": _load_avg()}


# ----------------------------------------------------------------------------- the run

@dataclass(frozen=True)
class RunSpec:
    """One pre-training run, resolved from the study config in one place (`from_study`):
    what `pretrain()` needs, as plain values and config sections."""
    out: Path
    arm: str
    seed: int
    data: DataConfig
    pretrain: PretrainConfig
    dbp: DBPConfig                       # the study's section: the arm derives its settings from
                                         # it, and validation probes its layers in every arm
    energy: EnergyConfig
    resolved_config: dict                # recorded in run.json; its digest keys the checkpoint
    manifest: Path | None = None         # the train subset (None: sampled from the data by seed)
    run_info: dict = field(default_factory=dict)  # run id, role, tuned, sweep point: as given

    @classmethod
    def from_study(cls, cfg: StudyConfig, arm: str, seed: int, out: str | Path,
                   manifest: str | Path | None = None, run_info: dict | None = None) -> RunSpec:
        return cls(Path(out), arm, seed, cfg.data, cfg.pretrain_for(arm), cfg.dbp, cfg.energy,
                   cfg.run_config(arm), Path(manifest) if manifest else None, run_info or {})


class RunState:
    """Everything a checkpoint holds, saved and loaded symmetrically: the learner (model,
    optimiser, scaler, DBP), the clock and energy meters, the global RNG, the step and the
    metric rows so far."""

    def __init__(self, learner: Learner, clock: Clock, meter: EnergyMeter, gpu: NvmlEnergy | None):
        self.learner, self.clock, self.meter, self.gpu = learner, clock, meter, gpu
        self.step, self.rows, self.resumed_from = 0, [], []
        self.partial: dict | None = None  # a segment cut by a stop signal: its loss and start clocks

    def state_dict(self) -> dict:
        return {"step": self.step, "rows": self.rows, "resumed_from": self.resumed_from,
                "partial": self.partial,
                **self.learner.state_dict(), "clock": self.clock.state_dict(),
                "energy": self.meter.state_dict(), "gpu_energy": self.gpu.state_dict() if self.gpu else None,
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state)
        self.clock.load_state_dict(state["clock"])
        self.meter.load_state_dict(state["energy"])
        if self.gpu is not None and state.get("gpu_energy"):
            self.gpu.load_state_dict(state["gpu_energy"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.rows, self.partial = state["step"], state["rows"], state.get("partial")
        self.resumed_from = state.get("resumed_from", []) + [self.step]

    def row(self, train_loss: float, ev: dict[str, float], segment: dict[str, float],
            train_images: int) -> dict:
        """The metrics.csv row of the current step (COLUMNS)."""
        clock, batch, energy = self.clock, self.learner.effective_batch, self.meter.totals()
        return {"step": self.step, "epoch": self.step * batch / train_images,
                "images_seen": self.step * batch, "train_seconds": clock.train_seconds,
                "eval_seconds": clock.excluded_seconds.get("eval", 0.0),
                "checkpoint_seconds": clock.excluded_seconds.get("checkpoint", 0.0),
                "train_loss": train_loss, "val_loss": ev["val_loss"],
                "energy_kwh": energy["energy_kwh"], "co2_kg": energy["co2_kg"],
                "lr": self.learner.lr, "decor_loss": ev["decor_loss"],
                "mean_abs_corr": ev["mean_abs_corr"], "cpu_seconds": clock.cpu_seconds, **segment,
                "measured_kwh": summed_over_ranks(self.gpu.kwh if self.gpu else math.nan,
                                                  self.learner.device)}


def pretrain(spec: RunSpec) -> dict:
    """Pre-train one arm for one seed into `spec.out`; returns the final run.json content.

    Timed training segments alternate with validation, which the clock excludes, on the
    `eval_every` schedule every arm shares; a checkpoint follows every `checkpoint_every`
    steps and the last one. Killed at any point, the same call resumes from the checkpoint;
    stopped by SIGTERM or SIGINT, it saves after the step in progress and raises Interrupted.
    One process at a time works in a run folder (RunLock, held by the lead rank).
    """
    device, rank, world = setup_device()
    with RunLock(spec.out, lead=rank == 0):
        return _pretrain(spec, device, rank, world)


def _pretrain(spec: RunSpec, device: torch.device, rank: int, world: int) -> dict:
    out, cfg = spec.out, spec.pretrain
    lead = rank == 0
    learner = Learner(cfg, get_arm(spec.arm), spec.dbp, spec.seed, device, world)  # same init, any arm
    model, batch = learner.model, learner.effective_batch
    data = _data(spec, model.patch_embed.img_size[0], out / "train_manifest.txt" if lead else None)
    probe = InputCorrelationProbe(model, spec.dbp.patterns(), kappa=spec.dbp.kappa)
    meter = EnergyMeter(enabled=spec.energy.enabled and lead, country_iso_code=spec.energy.country_iso_code,
                        measure_power_secs=spec.energy.measure_power_secs,
                        fallback_watts=spec.energy.fallback_watts, output_dir=out)
    gpu = NvmlEnergy.for_device(device) if spec.energy.enabled else None  # measured, per rank
    clock = Clock(device, meter=[meter, gpu])  # energy is metered exactly while the clock runs
    run = RunState(learner, clock, meter, gpu)
    digest = run_digest(spec.resolved_config, spec.arm, spec.seed, data.manifest_hash, world)
    info = _run_info(spec, learner, data, digest, world, device)
    if (state := _matching_checkpoint(out, digest, device, lead)) is not None:
        run.load_state_dict(state)
        info["resumed_from"] = run.resumed_from
        _say(lead, f"resuming {spec.arm}/seed{spec.seed} from step {run.step}")
    if lead:
        info["provenance"] = provenance()
        atomic_write_json(out / "run.json", info)

    def record(train_loss: float, segment: dict[str, float]) -> dict:
        with clock.excluded("eval"):
            ev = evaluate(model, data, device, learner.amp_dtype, probe, learner.batch_size)
            run.rows.append(run.row(train_loss, ev, segment, len(data.train)))
            if lead:
                atomic_write_text(out / "metrics.csv", _csv(run.rows))
        return run.rows[-1]

    if not run.rows:  # step 0: the untrained model, before the clock starts
        record(math.nan, _segment_stats(0, 0.0, 0.0))
    stream = micro_batches(data, spec.seed, run.step * cfg.accum_steps, learner.batch_size, rank, world,
                           spec.data.num_workers, device.type == "cuda", model.num_patches)
    bar = _progress(cfg.steps, run.step, lead, f"{spec.arm}/seed{spec.seed}")

    def save() -> None:
        if lead:
            with clock.excluded("checkpoint"):
                atomic_torch_save({**run.state_dict(), "run_digest": digest}, out / "checkpoint.pt")

    def close(status: str) -> None:  # the records, re-written also by a run resumed at its last step
        bar.close()
        if world > 1 and learner.driver is not None:
            info["r_identical_across_ranks"] = _r_identical_across_ranks(learner.driver, world)
        info.update(status=status, steps_done=run.step, train_seconds=clock.train_seconds,
                    cpu_seconds=clock.cpu_seconds, excluded_seconds=clock.excluded_seconds,
                    energy={**meter.totals(), "measured_kwh": run.rows[-1]["measured_kwh"],
                            "measured_method": f"{gpu.name}, summed over {world} rank(s)" if gpu else None},
                    skipped_images=data.train.skipped)
        if lead:
            if status == "finished":
                atomic_torch_save(_final(spec, learner, run.step, digest), out / "final.pt")
            atomic_write_text(out / "metrics.csv", _csv(run.rows))
            atomic_write_json(out / "run.json", info)

    status = "finished"
    with StopSignals() as stop, contextlib.closing(stream):
        while run.step < cfg.steps:
            seg_start = run.step // cfg.eval_every * cfg.eval_every  # a resumed segment started before
            seg_end = min(cfg.steps, seg_start + cfg.eval_every)
            part = run.partial or {"loss_sum": 0.0, "train_seconds": clock.train_seconds,
                                   "cpu_seconds": clock.cpu_seconds}
            seg_loss = torch.tensor(part["loss_sum"], device=device)
            signum = 0
            with clock.train():
                while run.step < seg_end and not (signum := stop.agreed(device, world)):
                    learner.set_lr(learning_rate(run.step, learner.peak_lr, cfg.warmup_steps, cfg.steps, cfg.min_lr))
                    seg_loss += learner.step([next(stream) for _ in range(cfg.accum_steps)])
                    run.step += 1
                    bar.update(1)
            if signum:  # between two steps: save them and stop (module dbp.interrupt)
                run.partial = {**part, "loss_sum": float(seg_loss)}
                save()
                info["interrupted_at_step"] = run.step
                close("interrupted")
                raise Interrupted(signum, str(out))
            run.partial = None
            train_loss = float(seg_loss) / (seg_end - seg_start)
            row = record(train_loss, _segment_stats((seg_end - seg_start) * batch,
                                                    clock.train_seconds - part["train_seconds"],
                                                    clock.cpu_seconds - part["cpu_seconds"]))
            bar.set_postfix(loss=f"{row['val_loss']:.4f}", img_s=f"{row['images_per_second']:.0f}")
            if not (math.isfinite(train_loss) and math.isfinite(row["val_loss"])):
                status, info["diverged_at_step"] = "diverged", run.step
                break
            if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
                save()
    close(status)
    _say(lead, f"{spec.arm}/seed{spec.seed}: {status} at step {run.step}, val_loss "
               f"{run.rows[-1]['val_loss']:.4f}, train {clock.train_seconds:.1f}s")
    return info


def _data(spec: RunSpec, image_size: int, manifest_out: Path | None) -> TrainData:
    """The seed's train subset (its manifest recorded beside the metrics) and the fixed
    validation images."""
    d = spec.data
    return prepare_pretrain_data(
        kind=d.kind, root=d.root, embedded_seed=d.embedded_seed, fraction=d.fraction,
        class_balanced=d.class_balanced, on_error=d.on_error, val_images=d.val_images,
        image_size=image_size, seed=spec.seed, cache_images=d.cache_images, manifest=spec.manifest,
        manifest_out=manifest_out)


def _run_info(spec: RunSpec, learner: Learner, data: TrainData, digest: str, world: int,
              device: torch.device) -> dict:
    """run.json's description of the run (the final state is added when it ends)."""
    return {**spec.run_info, "arm": spec.arm, "seed": spec.seed, "status": "running",
            "config": spec.resolved_config, "run_digest": digest, "manifest_hash": data.manifest_hash,
            "train_images": len(data.train), "val_images": len(data.val), "world_size": world,
            "device_batch": learner.batch_size, "effective_batch": learner.effective_batch,
            "peak_lr": learner.peak_lr, "autocast": str(learner.amp_dtype), "device": str(device),
            "optimizers": learner.param_split(), **step_cost(learner)}


def _final(spec: RunSpec, learner: Learner, step: int, digest: str) -> dict:
    """final.pt: the trained MAE and what `dbp export` needs to rebuild it (plain types)."""
    cfg = spec.pretrain
    return {"model_name": cfg.model, "model_kwargs": {"mask_ratio": cfg.mask_ratio,
                                                      "norm_pix_loss": cfg.norm_pix_loss},
            "dbp": dataclasses.asdict(learner.dbp_cfg) if learner.dbp_cfg else None,
            "state_dict": learner.model.state_dict(), "arm": spec.arm, "seed": spec.seed,
            "step": step, "run_digest": digest}


def _say(lead: bool, text: str) -> None:
    if lead:
        print(f"[pretrain] {text}", flush=True)


def _r_identical_across_ranks(driver: DBP, world: int) -> bool:
    """Check the all-reduce invariant: every rank holds the same R (a cheap checksum)."""
    local = torch.stack([m.R.double().sum() for m in driver.modules]).sum()
    sums = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sums, local)
    return all(torch.equal(s, sums[0]) for s in sums)


def _csv(rows: list[dict]) -> str:
    lines = [",".join(COLUMNS)]
    lines += [",".join(_fmt(r[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="step",
                disable=not (enabled and progress_enabled()), dynamic_ncols=True)
