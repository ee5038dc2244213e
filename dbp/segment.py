"""Semantic-segmentation fine-tuning of one encoder: UperNet on mmseg's MAE backbone.

`build_seg_config` writes an mmengine config (EncoderDecoder + MAE backbone sized from the
encoder's PRESETS entry + Feature2Pyramid + UPerHead + auxiliary FCNHead) for an
ADE20K-layout folder; `finetune` runs it through mmengine's Runner (train, IoU validation,
checkpoints, resume) and writes metrics.json and run.json beside mmengine's own logs.

What the training clock counts (dbp.clock.Clock, docs/protocol.md rule 3): from the first
training iteration of a process to the end of training, including data loading, the optimizer
and LR scheduling; excluded are validation (paused by hooks), checkpoint writing, runner
start-up and the data-loader fast-forward on resume. Energy is metered over exactly the counted time.

Quiet by default: the terminal gets mmengine's errors only; its INFO and WARNING log, mmseg's
stdout prints (LayerDecay's param-group JSON, the checkpoint loader) and Python warnings go to
the run's log file under `<out>/<timestamp>/`.
"""
from __future__ import annotations

import dbp._compat  # noqa: F401  (before timm/mmseg: see that module)

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.runner import Runner
from mmseg.evaluation import IoUMetric
from mmseg.registry import METRICS
from mmseg.utils import register_all_modules

from dbp.datasets import read_class_names
from dbp.embedded import ADE, make_embedded
from dbp.export import check_export, mae_backbone_cfg, read_export
from dbp.clock import Clock
from dbp.energy import EnergyMeter
from dbp.provenance import provenance
from dbp.records import atomic_write_json
from dbp.model import PRESETS
from dbp.subset import list_ade_stems, manifest_hash, read_manifest, sample_subset, write_manifest

# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class SegPreset:
    """A fine-tuning recipe. Iteration counts are for the full training set: they scale with
    the subset fraction, and warm-up, validation and checkpoint intervals with the iterations."""
    crop: int                            # training crop side = backbone img_size
    scale: tuple[int, int]               # (long, short) resize base, as mmseg's ADE pipeline
    ratio_range: tuple[float, float]     # RandomResize range around `scale`
    batch_size: int                      # total over devices
    iterations: int
    warmup: int
    val_interval: int
    checkpoint_interval: int
    lr: float
    weight_decay: float
    layer_decay: float
    drop_path_rate: float
    rescales: tuple[float, ...]          # Feature2Pyramid: 4 levels at these x the ViT grid
    head_channels: int                   # UPerHead channels
    aux_channels: int                    # FCNHead channels
    test_mode: Literal["slide", "whole"]
    test_stride: int                     # slide stride (crop = `crop`)
    val_batch_size: int
    amp: bool                            # AmpOptimWrapper when on CUDA (it asserts on CPU)


SEG_PRESETS: dict[str, SegPreset] = {
    # mmseg's mae-base_upernet_8xb2-amp-160k_ade20k-512x512 (the paper's recipe, ViT-B/16).
    "paper": SegPreset(crop=512, scale=(2048, 512), ratio_range=(0.5, 2.0), batch_size=16,
                       iterations=160_000, warmup=1500, val_interval=16_000,
                       checkpoint_interval=16_000, lr=1e-4, weight_decay=0.05, layer_decay=0.65,
                       drop_path_rate=0.1, rescales=(4, 2, 1, 0.5), head_channels=768,
                       aux_channels=256, test_mode="slide", test_stride=341, val_batch_size=1,
                       amp=True),
    # The embedded default (64x64 mosaics, ~2 min on 2 CPU cores): random 32x32 crops at the
    # pre-training resolution (pos_embed used as pre-trained), slide 32/16 at test. Patch 4
    # puts the ViT grid at stride 4 already, so the pyramid is (2, 1, 1/2, 1/4) x the grid
    # (strides 2-16; (4, 2, 1, 1/2) cost 2.2x the time per iteration here).
    "cpu_tiny": SegPreset(crop=32, scale=(256, 64), ratio_range=(0.5, 2.0), batch_size=16,
                          iterations=1000, warmup=50, val_interval=1000, checkpoint_interval=250,
                          lr=1e-3, weight_decay=0.05, layer_decay=0.65, drop_path_rate=0.1,
                          rescales=(2, 1, 0.5, 0.25), head_channels=64, aux_channels=32,
                          test_mode="slide", test_stride=16, val_batch_size=8, amp=False),
}
_UPSTREAM_OUT_INDICES = {12: (3, 5, 7, 11)}  # mmseg's MAE/BEiT UperNet configs


def out_indices(depth: int) -> tuple[int, ...]:
    """Four blocks feeding the pyramid: mmseg's choice for depth 12, else evenly spread."""
    if depth in _UPSTREAM_OUT_INDICES:
        return _UPSTREAM_OUT_INDICES[depth]
    if depth < 4:
        raise ValueError(f"UperNet needs 4 feature levels; depth {depth} has fewer blocks")
    return tuple(round((i + 1) * depth / 4) - 1 for i in range(4))


def _scaled(n: int, preset: SegPreset, iterations: int) -> int:
    """A preset interval scaled to the run's iteration count, at least 1."""
    return max(1, round(n * iterations / preset.iterations))


def run_iterations(preset: SegPreset, fraction: float, iterations: int | None = None) -> int:
    """The preset's iterations scaled by the subset fraction, unless overridden."""
    return iterations if iterations is not None else max(1, round(preset.iterations * fraction))


# ----------------------------------------------------------------------------- config builder

def _dataset(ade_root: Path, split: str, classes: list[str], pipeline: list[dict],
             ann_file: Path | None) -> dict:
    """mmseg's ADE20K dataset settings with the class list from the data, not ADE's 150:
    BaseSegDataset (ADE20KDataset would remap any other class list against its own)."""
    return dict(type="BaseSegDataset", data_root=str(ade_root),
                data_prefix=dict(img_path=f"images/{split}", seg_map_path=f"annotations/{split}"),
                ann_file=str(ann_file) if ann_file else "", img_suffix=".jpg",
                seg_map_suffix=".png", reduce_zero_label=True,
                metainfo=dict(classes=tuple(classes)), pipeline=pipeline)


def _pipelines(p: SegPreset) -> tuple[list[dict], list[dict]]:
    train = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
             dict(type="RandomResize", scale=p.scale, ratio_range=p.ratio_range, keep_ratio=True),
             dict(type="RandomCrop", crop_size=(p.crop, p.crop), cat_max_ratio=0.75),
             dict(type="RandomFlip", prob=0.5), dict(type="PhotoMetricDistortion"),
             dict(type="PackSegInputs")]
    test = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=p.scale, keep_ratio=True),
            dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
    return train, test


def _model(model_name: str, p: SegPreset, num_classes: int, pretrained: Path | None,
           norm: str) -> dict:
    dim, depth = PRESETS[model_name]["embed_dim"], PRESETS[model_name]["depth"]
    norm_cfg = dict(type=norm, requires_grad=True)
    test_cfg = (dict(mode="slide", crop_size=(p.crop, p.crop), stride=(p.test_stride,) * 2)
                if p.test_mode == "slide" else dict(mode="whole"))
    return dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255, size=(p.crop, p.crop)),
        backbone=mae_backbone_cfg(model_name, img_size=p.crop, out_indices=out_indices(depth),
                                  drop_path_rate=p.drop_path_rate, checkpoint=pretrained),
        neck=dict(type="Feature2Pyramid", embed_dim=dim, rescales=list(p.rescales),
                  norm_cfg=norm_cfg),
        decode_head=dict(type="UPerHead", in_channels=[dim] * 4, in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=p.head_channels, dropout_ratio=0.1,
                         num_classes=num_classes, norm_cfg=norm_cfg, align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False,
                                          loss_weight=1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=dim, in_index=2,
                            channels=p.aux_channels, num_convs=1, concat_input=False,
                            dropout_ratio=0.1, num_classes=num_classes, norm_cfg=norm_cfg,
                            align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False,
                                             loss_weight=0.4)),
        train_cfg=dict(), test_cfg=test_cfg)


def _schedule(p: SegPreset, iters: int) -> list[dict]:
    """Linear warm-up from ~0, then linear (poly power 1) decay to 0, per iteration."""
    warmup = min(_scaled(p.warmup, p, iters), iters - 1)
    poly = dict(type="PolyLR", eta_min=0.0, power=1.0, begin=warmup, end=iters, by_epoch=False)
    if warmup == 0:
        return [poly]
    return [dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=warmup), poly]


def build_seg_config(*, work_dir: str | Path, ade_root: str | Path, train_manifest: str | Path,
                     model_name: str, pretrained: str | Path | None, seed: int,
                     preset: str = "cpu_tiny", fraction: float = 1.0,
                     iterations: int | None = None, num_workers: int = 0,
                     world_size: int = 1) -> dict[str, Any]:
    """The mmengine config (a plain dict) for fine-tuning `model_name` on an ADE-layout folder.

    The class list comes from `ade_root/objectInfo150.txt`; the training images are the stems
    in `train_manifest` (mmseg's ann_file). `world_size` splits the total batch over devices.
    """
    p = SEG_PRESETS[preset]
    if p.batch_size % world_size:
        raise ValueError(f"batch {p.batch_size} does not split over {world_size} devices")
    ade_root = Path(ade_root)
    classes = read_class_names(ade_root)
    iters = run_iterations(p, fraction, iterations)
    train_pipe, test_pipe = _pipelines(p)
    on_gpu = torch.cuda.is_available()
    workers = dict(num_workers=num_workers, persistent_workers=num_workers > 0)
    return dict(
        default_scope="mmseg",
        work_dir=str(work_dir),
        model=_model(model_name, p, len(classes), pretrained and Path(pretrained),
                     "SyncBN" if world_size > 1 else "BN"),
        train_dataloader=dict(batch_size=p.batch_size // world_size, **workers,
                              sampler=dict(type="InfiniteSampler", shuffle=True, seed=seed),
                              dataset=_dataset(ade_root, "training", classes, train_pipe,
                                               Path(train_manifest).resolve())),
        val_dataloader=dict(batch_size=p.val_batch_size, **workers,
                            sampler=dict(type="DefaultSampler", shuffle=False),
                            dataset=_dataset(ade_root, "validation", classes, test_pipe, None)),
        val_evaluator=dict(type="DBPIoUMetric", iou_metrics=["mIoU"]),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=iters,
                       val_interval=_scaled(p.val_interval, p, iters)),
        val_cfg=dict(type="ValLoop"),
        optim_wrapper=dict(
            type="AmpOptimWrapper" if p.amp and on_gpu else "OptimWrapper",
            optimizer=dict(type="AdamW", lr=p.lr, betas=(0.9, 0.999), weight_decay=p.weight_decay),
            constructor="LearningRateDecayOptimizerConstructor",
            paramwise_cfg=dict(num_layers=PRESETS[model_name]["depth"], decay_rate=p.layer_decay,
                               decay_type="layer_wise")),
        param_scheduler=_schedule(p, iters),
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=min(50, iters), log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", by_epoch=False, max_keep_ckpts=2,
                            interval=_scaled(p.checkpoint_interval, p, iters)),
            sampler_seed=dict(type="DistSamplerSeedHook")),
        env_cfg=dict(cudnn_benchmark=on_gpu, mp_cfg=dict(mp_start_method="fork",
                                                         opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl" if on_gpu else "gloo")),
        launcher="pytorch" if world_size > 1 else "none",
        randomness=dict(seed=seed, deterministic=False),
        log_processor=dict(by_epoch=False),
        log_level="INFO",
        visualizer=dict(type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")]),
    )


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
                        "per_class_iou": _by_name(names, iou),
                        "per_class_acc": _by_name(names, acc)}
        return metrics


def _by_name(names: list[str], values: np.ndarray) -> dict[str, float | None]:
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


# ----------------------------------------------------------------------------- fine-tuning

def ade_root(kind: str, root: str | Path, embedded_seed: int) -> Path:
    """The ADE20K-layout folder: made on demand (and cached) for the embedded default."""
    if kind == "embedded":
        return make_embedded(root, seed=embedded_seed) / ADE
    return Path(root)


def _pretrained_info(pretrained: Path | None, model_name: str) -> dict[str, Any]:
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
    """Digest of everything that decides a fine-tune: the Runner config (data, model, seed,
    schedule) and the bytes of the encoder it starts from."""
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    if pretrained is not None:
        h.update(pretrained.read_bytes())
    return h.hexdigest()


def _previous(out: Path, digest: str) -> dict | None:
    """metrics.json of a finished run in `out` made with this digest, else None. State made
    with another digest (config, seed or encoder changed) is deleted, never resumed or reused."""
    try:
        info = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("run_digest") != digest:
        print(f"[finetune] {out} holds a run made with a different config or encoder (digest "
              f"{str(info.get('run_digest'))[:12]} != {digest[:12]}): starting over", flush=True)
        for stale in [out / "metrics.json", out / "last_checkpoint", *out.glob("iter_*.pth")]:
            stale.unlink(missing_ok=True)
        return None
    if info.get("status") != "finished" or not (out / "metrics.json").is_file():
        return None
    return json.loads((out / "metrics.json").read_text())


def finetune(out_dir: str | Path, *, pretrained: str | Path | None, data_root: str | Path,
             seed: int, model_name: str = "mae_vit_tiny_patch4_32", preset: str = "cpu_tiny",
             iterations: int | None = None, fraction: float = 0.1,
             manifest: str | Path | None = None, num_workers: int = 0,
             energy_enabled: bool = True, country_iso_code: str = "NLD",
             measure_power_secs: float = 15.0, fallback_watts: float = 18.0,
             verbose: bool = False, resolved_config: dict | None = None) -> dict[str, Any]:
    """Fine-tune one encoder (an export, or None for the random-init "scratch" arm) on the
    ADE-layout folder `data_root`; returns the metrics written to `out_dir/metrics.json`.

    A run already finished in `out_dir` with the same config and encoder is returned as is;
    an interrupted one resumes from its last checkpoint; state from another config or encoder
    is discarded. The pretrained file is checked (exists, mmseg loads every weight) before
    anything is trained.
    """
    out = Path(out_dir)
    ade = Path(data_root)
    pre = _pretrained_info(Path(pretrained) if pretrained is not None else None, model_name)
    out.mkdir(parents=True, exist_ok=True)
    stems = _train_stems(ade, out, fraction, seed, manifest)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = build_seg_config(work_dir=out, ade_root=ade, train_manifest=out / "train_manifest.txt",
                           model_name=model_name, pretrained=pretrained, seed=seed, preset=preset,
                           fraction=fraction, iterations=iterations, num_workers=num_workers,
                           world_size=world)
    digest = run_digest(cfg, Path(pretrained) if pretrained is not None else None)
    done = _previous(out, digest)
    if done is not None:
        return done
    resume = (out / "last_checkpoint").exists()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meter = EnergyMeter(enabled=energy_enabled and int(os.environ.get("RANK", "0")) == 0,
                        country_iso_code=country_iso_code, measure_power_secs=measure_power_secs,
                        fallback_watts=fallback_watts, output_dir=out)
    clock = Clock(device, meter=meter)
    info = {**pre, "seed": seed, "preset": preset, "model_name": model_name, "status": "running",
            "train_images": len(stems), "manifest_hash": manifest_hash(stems),
            "config": resolved_config, "run_digest": digest, "mmengine_config": cfg, "device": str(device),
            "world_size": world, "provenance": provenance()}
    atomic_write_json(out / "run.json", info)

    register_all_modules(init_default_scope=False)
    early: list[str] = []
    with _warnings_to(early) if not verbose else contextlib.nullcontext():
        runner = _Runner.from_cfg(Config({**cfg, "quiet": not verbose, "resume": resume}))
    for w in early:
        runner.logger.info(w)
    runner.clock = clock
    hook = _ClockHook(clock)
    runner.register_hook(hook)
    try:
        with _to_log_file(runner.logger) if not verbose else contextlib.nullcontext():
            runner.train()
            if not hook.validated:  # resumed at the last iteration: killed while validating
                runner.val()
    except BaseException as e:
        hook.close()
        if is_main_process():
            atomic_write_json(out / "run.json", {**info, "status": "failed", "error": repr(e)})
        raise
    if not is_main_process():
        return {}
    summary = runner.val_evaluator.metrics[0].summary
    energy = meter.totals()
    metrics = {**summary, "arm": pre["arm"], "seed": seed, "iterations": runner.iter,
               "train_seconds": clock.train_seconds, "excluded_seconds": clock.excluded_seconds,
               "energy_kwh": energy["energy_kwh"], "co2_kg": energy["co2_kg"],
               "energy_method": energy["method"], "num_classes": len(summary["per_class_iou"]),
               "train_images": len(stems), "val_images": len(runner.val_dataloader.dataset)}
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "run.json", {**info, "status": "finished", "energy": energy,
                                         "resumed_from": hook.resumed_from,
                                         "log_dir": runner.log_dir})
    return metrics
