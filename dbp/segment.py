"""Semantic-segmentation fine-tuning of one encoder: UperNet on mmseg's MAE backbone.

`finetune` runs a recipe's mmengine config (dbp.seg_recipe) through mmengine's Runner (train,
IoU validation, checkpoints, resume) and writes metrics.json and run.json beside mmengine's
own logs. On CPU the same encoder, data, recipe and seed give the same metrics.

What the training clock counts (dbp.clock.Clock, docs/protocol.md rule 3): from the first
training iteration of a process to the end of training, including data loading, the optimizer
and LR scheduling; excluded are validation (paused by hooks), checkpoint writing, runner
start-up and the data-loader fast-forward on resume. Energy is metered over exactly the counted time.

Quiet by default: the terminal gets mmengine's errors only; its INFO and WARNING log, mmseg's
stdout prints (LayerDecay's param-group JSON, the checkpoint loader) and Python warnings go to
the run's log file under `<out>/<timestamp>/`.
"""
from __future__ import annotations

from dbp._compat import mm_shims

mm_shims()  # before mmcv, mmengine and mmseg (see dbp._compat)

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.runner import Runner
from mmseg.evaluation import IoUMetric
from mmseg.registry import METRICS
from mmseg.utils import register_all_modules

from dbp.datasets import check_pairs, read_class_names
from dbp.embedded import ADE, make_embedded
from dbp.export import check_export, read_export
from dbp.clock import Clock
from dbp.energy import EnergyMeter
from dbp.provenance import provenance
from dbp.interrupt import Interrupted, RunLock, StopSignals
from dbp.records import atomic_write_json, atomic_write_text
from dbp.seg_recipe import SegPreset, build_seg_config
from dbp.subset import list_ade_stems, manifest_hash, read_manifest, sample_subset, write_manifest

# ----------------------------------------------------------------------------- metric


@METRICS.register_module(name="DBPIoUMetric")
class PerClassIoUMetric(IoUMetric):
    """mmseg's IoUMetric, also keeping unrounded fractions and the per-class values.

    IoUMetric returns only means in percent rounded to 2 decimals, and prints the per-class
    table to the log; `summary` holds aAcc, mIoU, mAcc in [0, 1] and per-class IoU/Acc (NaN
    for a class absent from both labels and predictions, left out of the means as mmseg does).
    """

    summary: dict[str, Any] | None = None

    def compute_metrics(self, results: list) -> dict[str, float]:
        metrics = super().compute_metrics(results)
        inter, union, _, label = (sum(r[i] for r in results).numpy().astype(np.float64)
                                  for i in range(4))
        with np.errstate(divide="ignore", invalid="ignore"):
            iou, acc = inter / union, inter / label
        names = self.dataset_meta["classes"]
        self.summary = {"aAcc": float(inter.sum() / label.sum()),
                        "mIoU": float(np.nanmean(iou)), "mAcc": float(np.nanmean(acc)),
                        "per_class_iou": by_name(names, iou),
                        "per_class_acc": by_name(names, acc)}
        return metrics


def by_name(names: list[str], values: np.ndarray) -> dict[str, float | None]:
    """{class: value}, NaN as None (JSON has no NaN)."""
    return {n: None if np.isnan(v) else float(v) for n, v in zip(names, values, strict=True)}


# ----------------------------------------------------------------------------- runner


class _Runner(Runner):
    """mmengine's Runner with a quiet terminal (errors only: its warnings are known deprecation
    notes; the log file keeps everything) and the training clock paused while a checkpoint is
    written."""

    clock: Clock | None = None

    def build_logger(self, log_level="INFO", log_file=None, **kwargs):
        logger = super().build_logger(log_level=log_level, log_file=log_file, **kwargs)
        if self.cfg.get("quiet", True):
            for h in logger.handlers:
                if type(h) is logging.StreamHandler:
                    h.setLevel(logging.ERROR)
        return logger

    def save_checkpoint(self, *args, **kwargs):
        with self.clock.excluded("checkpoint") if self.clock else contextlib.nullcontext():
            super().save_checkpoint(*args, **kwargs)


class _ClockHook(Hook):
    """Opens the training clock at the first iteration, pauses it for validation, and keeps
    the clock's and energy meter's totals in mmengine's checkpoints across resumes."""

    priority = "HIGHEST"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.spans = contextlib.ExitStack()
        self.val_span: contextlib.AbstractContextManager | None = None
        self.training = False
        self.validated = False
        self.resumed_from: int | None = None

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if not self.training:
            self.spans.enter_context(self.clock.train())
            self.training = True

    def before_val(self, runner) -> None:
        self.val_span = self.clock.excluded("eval")
        self.val_span.__enter__()

    def after_val(self, runner) -> None:
        self.val_span.__exit__(None, None, None)
        self.val_span = None
        self.validated = True

    def after_train(self, runner) -> None:
        self.close()

    def close(self) -> None:
        """End every open span (also after a crash, so codecarbon's task stops)."""
        if self.val_span is not None:
            self.val_span.__exit__(None, None, None)
            self.val_span = None
        self.spans.close()
        self.training = False

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint["dbp_clock"] = self.clock.state_dict()
        checkpoint["dbp_energy"] = [m.state_dict() for m in self.clock.meters]

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self.clock.load_state_dict(checkpoint["dbp_clock"])
        for meter, state in zip(self.clock.meters, checkpoint["dbp_energy"]):
            meter.load_state_dict(state)
        self.resumed_from = checkpoint["meta"]["iter"]


class _StopHook(Hook):
    """SIGTERM or SIGINT (dbp.interrupt): after the iteration in progress, a checkpoint that
    mmengine resumes from (`last_checkpoint` names it), then Interrupted. Without it a
    preempted fine-tune would lose everything since its last scheduled checkpoint (the paper
    recipe has one, at the end)."""

    priority = "LOWEST"

    def __init__(self, stop: StopSignals, device: torch.device, world: int) -> None:
        self.stop, self.device, self.world = stop, device, world

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not (signum := self.stop.agreed(self.device, self.world)):
            return
        name = f"iter_{runner.iter + 1}.pth"
        runner.save_checkpoint(runner.work_dir, name, by_epoch=False)
        if is_main_process():
            atomic_write_text(Path(runner.work_dir) / "last_checkpoint", str(Path(runner.work_dir) / name))
        raise Interrupted(signum, str(runner.work_dir))


class _LogStream(io.TextIOBase):
    """A stdout replacement writing each line to a logger at INFO (the log file only)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.buffer = logger, ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line)
        return len(text)


@contextlib.contextmanager
def _warnings_to(sink: list[str] | logging.Logger) -> Iterator[None]:
    """Route Python warnings into a list or a logger (at INFO: the log file, not the terminal)."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{category.__name__}: {message} ({filename}:{lineno})"
        if isinstance(sink, list):
            sink.append(text)
        else:
            sink.info(text)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _to_log_file(logger: logging.Logger) -> Iterator[None]:
    """stdout prints and Python warnings into the run's log file."""
    with contextlib.redirect_stdout(_LogStream(logger)), _warnings_to(logger):
        yield


@contextlib.contextmanager
def _determinism_restored() -> Iterator[None]:
    """Undo mmengine's process-wide `torch.use_deterministic_algorithms(True)` (a CPU run's
    `randomness`) once the run is over, so that later work in the process runs as before."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


# ----------------------------------------------------------------------------- fine-tuning

def ade_root(kind: str, root: str | Path, embedded_seed: int) -> Path:
    """The ADE20K-layout folder: made on demand (and cached) for the embedded default."""
    if kind == "embedded":
        return make_embedded(root, seed=embedded_seed) / ADE
    return Path(root)


def pretrained_info(pretrained: Path | None, model_name: str) -> dict[str, Any]:
    """Check an export before any training (FileNotFoundError / ExportError); describe it."""
    if pretrained is None:
        return {"pretrained": None, "arm": "scratch"}
    report = check_export(pretrained, model_name=model_name)
    meta = read_export(pretrained)[1]
    return {"pretrained": str(pretrained.resolve()), "arm": meta.get("arm", "unknown"),
            "pretrained_meta": {k: v for k, v in meta.items() if k != "provenance"},
            "pretrained_check": {k: v for k, v in report.items() if k != "init_keys"}}


def _train_stems(ade: Path, out: Path, fraction: float, seed: int,
                 manifest: str | Path | None) -> list[str]:
    """The run's training stems (from `manifest`, else sampled by seed), recorded in `out`."""
    stems = (read_manifest(manifest) if manifest is not None
             else sample_subset(list_ade_stems(ade, "training"), fraction, seed))
    if not stems:
        raise ValueError(f"{ade}: no training images")
    write_manifest(out / "train_manifest.txt", stems)
    return stems


def run_digest(cfg: dict, pretrained: Path | None) -> str:
    """Digest of everything that decides a downstream run: its config (for a fine-tune the
    Runner config: data, model, seed, schedule) and the bytes of the encoder it starts from."""
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    if pretrained is not None:
        h.update(pretrained.read_bytes())
    return h.hexdigest()


def previous_run(out: Path, digest: str, stage: str, state: Iterable[Path] = ()) -> dict | None:
    """metrics.json of a finished `stage` run in `out` made with this digest, else None.
    metrics.json and the resumable `state` files made with another digest (config, seed or
    encoder changed) are deleted, never resumed or reused."""
    try:
        info = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("run_digest") != digest:
        print(f"[{stage}] {out} holds a run made with a different config or encoder (digest "
              f"{str(info.get('run_digest'))[:12]} != {digest[:12]}): starting over", flush=True)
        for stale in [out / "metrics.json", *state]:
            stale.unlink(missing_ok=True)
        return None
    if info.get("status") != "finished" or not (out / "metrics.json").is_file():
        return None
    return json.loads((out / "metrics.json").read_text())


def finetune(out_dir: str | Path, *, recipe: SegPreset, pretrained: str | Path | None,
             data_root: str | Path, seed: int, model_name: str, fraction: float,
             manifest: str | Path | None, num_workers: int, energy: Mapping[str, Any],
             verbose: bool, resolved_config: dict | None) -> dict[str, Any]:
    """Fine-tune one encoder (an export, or None for the random-init "scratch" arm) with
    `recipe` on the ADE-layout folder `data_root`; returns the metrics written to
    `out_dir/metrics.json`. `energy` holds dbp.energy.EnergyMeter's settings (metered on rank
    0 only). Every setting is required: defaults here could disagree with the study config's.

    A run already finished in `out_dir` with the same config and encoder is returned as is;
    an interrupted one resumes from its last checkpoint; state from another config or encoder
    is discarded. The pretrained file is checked (exists, mmseg loads every weight) before
    anything is trained. One process at a time works in `out_dir` (RunLock); SIGTERM or
    SIGINT saves a checkpoint after the iteration in progress and raises Interrupted.
    """
    with RunLock(Path(out_dir), lead=int(os.environ.get("RANK", "0")) == 0):
        return _finetune(Path(out_dir), recipe, pretrained, Path(data_root), seed, model_name, fraction,
                         manifest, num_workers, energy, verbose, resolved_config)


def _finetune(out: Path, recipe: SegPreset, pretrained: str | Path | None, ade: Path, seed: int,
              model_name: str, fraction: float, manifest: str | Path | None, num_workers: int,
              energy: Mapping[str, Any], verbose: bool, resolved_config: dict | None) -> dict[str, Any]:
    pre = pretrained_info(Path(pretrained) if pretrained is not None else None, model_name)
    out.mkdir(parents=True, exist_ok=True)
    stems = _train_stems(ade, out, fraction, seed, manifest)
    check_pairs(ade, stems)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available()
    cfg = build_seg_config(recipe, work_dir=out, ade_root=ade, classes=read_class_names(ade),
                           train_manifest=out / "train_manifest.txt", model_name=model_name,
                           pretrained=pretrained, seed=seed, fraction=fraction,
                           num_workers=num_workers, world_size=world, on_gpu=on_gpu)
    digest = run_digest(cfg, Path(pretrained) if pretrained is not None else None)
    done = previous_run(out, digest, "finetune", [out / "last_checkpoint", *out.glob("iter_*.pth")])
    if done is not None:
        return done
    resume = (out / "last_checkpoint").exists()
    device = torch.device("cuda" if on_gpu else "cpu")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    meter = EnergyMeter(**{**energy, "enabled": energy["enabled"] and rank0}, output_dir=out)
    clock = Clock(device, meter=meter)
    info = {**pre, "seed": seed, "preset": recipe.name, "recipe": dataclasses.asdict(recipe),
            "model_name": model_name, "status": "running", "train_images": len(stems),
            "manifest_hash": manifest_hash(stems), "config": resolved_config,
            "run_digest": digest, "mmengine_config": cfg, "device": str(device),
            "world_size": world, "provenance": provenance()}
    atomic_write_json(out / "run.json", info)

    register_all_modules(init_default_scope=False)
    with _determinism_restored():
        early: list[str] = []
        with _warnings_to(early) if not verbose else contextlib.nullcontext():
            runner = _Runner.from_cfg(Config({**cfg, "quiet": not verbose, "resume": resume}))
        for w in early:
            runner.logger.info(w)
        runner.clock = clock
        hook = _ClockHook(clock)
        runner.register_hook(hook)
        try:
            with _to_log_file(runner.logger) if not verbose else contextlib.nullcontext(), \
                    StopSignals() as stop:
                runner.register_hook(_StopHook(stop, device, world))
                runner.train()
                if not hook.validated:  # resumed at the last iteration: killed while validating
                    runner.val()
        except BaseException as e:
            hook.close()
            if is_main_process():
                status = "interrupted" if isinstance(e, Interrupted) else "failed"
                atomic_write_json(out / "run.json", {**info, "status": status, "error": repr(e)})
            raise
    if not is_main_process():
        return {}
    summary = runner.val_evaluator.metrics[0].summary
    used = meter.totals()
    metrics = {**summary, "arm": pre["arm"], "seed": seed, "iterations": runner.iter,
               "train_seconds": clock.train_seconds, "excluded_seconds": clock.excluded_seconds,
               "energy_kwh": used["energy_kwh"], "co2_kg": used["co2_kg"],
               "energy_method": used["method"], "num_classes": len(summary["per_class_iou"]),
               "train_images": len(stems), "val_images": len(runner.val_dataloader.dataset)}
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "run.json", {**info, "status": "finished", "energy": used,
                                         "resumed_from": hook.resumed_from,
                                         "log_dir": runner.log_dir})
    return metrics
