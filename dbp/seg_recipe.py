"""The segmentation fine-tuning recipe as plain data: presets, overrides and the mmengine config.

`build_seg_config` writes the mmengine config (EncoderDecoder + MAE backbone sized from the
encoder's PRESETS entry + Feature2Pyramid + UPerHead + auxiliary FCNHead) for an ADE20K-layout
folder as a plain dict. No torch, mmengine or mmseg here, so a recipe can be resolved and its
config checked without them; `dbp.segment` runs it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dbp.presets import PRESETS


@dataclass(frozen=True)
class SegPreset:
    """A fine-tuning recipe.

    `full_set_iterations` is the schedule on the full training set: a run on a subset trains
    that x the subset fraction unless `iterations` pins the run's length. The validation and
    checkpoint intervals are given for `full_set_iterations` and scale with the run's length;
    so does the warm-up when `warmup_scales`, else it is a fixed count (mmseg's 1,500).
    """
    name: str
    crop: int                            # training crop side = backbone img_size
    scale: tuple[int, int]               # (long, short) resize base, as mmseg's ADE pipeline
    ratio_range: tuple[float, float]     # RandomResize range around `scale`
    batch_size: int                      # total over devices
    full_set_iterations: int
    warmup: int
    warmup_scales: bool
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
    amp: bool                            # AmpOptimWrapper on CUDA (it asserts on CPU)
    iterations: int | None = None        # the run's length, pinned (overrides the scaling)


# mmseg's mae-base_upernet_8xb2-amp-160k_ade20k-512x512 (ViT-B/16).
_PAPER = SegPreset(name="paper", crop=512, scale=(2048, 512), ratio_range=(0.5, 2.0),
                   batch_size=16, full_set_iterations=160_000, warmup=1500, warmup_scales=False,
                   val_interval=16_000, checkpoint_interval=16_000, lr=1e-4, weight_decay=0.05,
                   layer_decay=0.65, drop_path_rate=0.1, rescales=(4, 2, 1, 0.5),
                   head_channels=768, aux_channels=256, test_mode="slide", test_stride=341,
                   val_batch_size=1, amp=True)

SEG_PRESETS: dict[str, SegPreset] = {p.name: p for p in (
    _PAPER,
    # mmseg's recipe with the MAE authors' lr and layer decay. Which of the two the paper
    # fine-tuned with is unknown, so both are here.
    dataclasses.replace(_PAPER, name="paper_mae", lr=8e-5, layer_decay=0.8),
    # The embedded default (64x64 mosaics, ~2 min on 2 CPU cores): random 32x32 crops at the
    # pre-training resolution (pos_embed used as pre-trained), slide 32/16 at test. Patch 4
    # puts the ViT grid at stride 4 already, so the pyramid is (2, 1, 1/2, 1/4) x the grid
    # (strides 2-16; (4, 2, 1, 1/2) cost 2.2x the time per iteration here).
    SegPreset(name="cpu_tiny", crop=32, scale=(256, 64), ratio_range=(0.5, 2.0), batch_size=16,
              full_set_iterations=1000, warmup=50, warmup_scales=True, val_interval=1000,
              checkpoint_interval=250, lr=1e-3, weight_decay=0.05, layer_decay=0.65,
              drop_path_rate=0.1, rescales=(2, 1, 0.5, 0.25), head_channels=64, aux_channels=32,
              test_mode="slide", test_stride=16, val_batch_size=8, amp=False),
)}
OVERRIDABLE = ("lr", "layer_decay", "warmup", "drop_path_rate", "weight_decay", "iterations")
_UPSTREAM_OUT_INDICES = {12: (3, 5, 7, 11)}  # mmseg's MAE/BEiT UperNet configs


def resolve_recipe(preset: str, overrides: dict[str, Any]) -> SegPreset:
    """The preset `preset` with `overrides` (keys among OVERRIDABLE) applied. An overridden
    warm-up is taken as the count asked for: it no longer scales with the run's length."""
    if preset not in SEG_PRESETS:
        raise ValueError(f"unknown segmentation preset {preset!r}; choose one of "
                         f"{sorted(SEG_PRESETS)}")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"cannot override {', '.join(unknown)} of a segmentation recipe; "
                         f"only {', '.join(OVERRIDABLE)}")
    pinned = {"warmup_scales": False} if "warmup" in overrides else {}
    return dataclasses.replace(SEG_PRESETS[preset], **overrides, **pinned)


def out_indices(depth: int) -> tuple[int, ...]:
    """Four blocks feeding the pyramid: mmseg's choice for depth 12, else evenly spread."""
    if depth in _UPSTREAM_OUT_INDICES:
        return _UPSTREAM_OUT_INDICES[depth]
    if depth < 4:
        raise ValueError(f"UperNet needs 4 feature levels; depth {depth} has fewer blocks")
    return tuple(round((i + 1) * depth / 4) - 1 for i in range(4))


def run_iterations(recipe: SegPreset, fraction: float) -> int:
    """The run's length: pinned, else the full-set schedule scaled by the subset fraction."""
    if recipe.iterations is not None:
        return recipe.iterations
    return max(1, round(recipe.full_set_iterations * fraction))


def _scaled(n: int, recipe: SegPreset, iterations: int) -> int:
    """An interval given for the full-set schedule, scaled to the run's length, at least 1."""
    return max(1, round(n * iterations / recipe.full_set_iterations))


def mae_backbone_cfg(model_name: str, *, img_size: int | None = None,
                     out_indices: tuple[int, ...] | None = None, drop_path_rate: float = 0.0,
                     checkpoint: str | Path | None = None) -> dict[str, Any]:
    """mmseg `MAE` backbone config whose weights an export of `model_name` fits exactly.

    init_values=1.0 and LN eps 1e-6 make the block the timm block (layer scale = identity).
    `img_size` defaults to the pre-training size; another size makes mmseg resize pos_embed.
    """
    p = PRESETS[model_name]
    return dict(type="MAE", img_size=(img_size or p["img_size"],) * 2, patch_size=p["patch_size"],
                in_channels=3, embed_dims=p["embed_dim"], num_layers=p["depth"],
                num_heads=p["num_heads"], mlp_ratio=4,
                out_indices=tuple(range(p["depth"])) if out_indices is None else out_indices,
                attn_drop_rate=0.0, drop_path_rate=drop_path_rate,
                norm_cfg=dict(type="LN", eps=1e-6), act_cfg=dict(type="GELU"), norm_eval=False,
                final_norm=False, init_values=1.0,
                init_cfg=None if checkpoint is None else dict(type="Pretrained",
                                                              checkpoint=str(checkpoint)))


# ----------------------------------------------------------------------------- config builder

def _dataset(ade_root: Path, split: str, classes: Sequence[str], pipeline: list[dict],
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
    warmup = min(_scaled(p.warmup, p, iters) if p.warmup_scales else p.warmup, iters - 1)
    poly = dict(type="PolyLR", eta_min=0.0, power=1.0, begin=warmup, end=iters, by_epoch=False)
    if warmup == 0:
        return [poly]
    return [dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=warmup), poly]


def build_seg_config(recipe: SegPreset, *, work_dir: str | Path, ade_root: str | Path,
                     classes: Sequence[str], train_manifest: str | Path, model_name: str,
                     pretrained: str | Path | None, seed: int, fraction: float, num_workers: int,
                     world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The mmengine config (a plain dict) for fine-tuning `model_name` on an ADE-layout folder.

    The training images are the stems in `train_manifest` (mmseg's ann_file); `world_size`
    splits the total batch over devices. On CPU the run is deterministic (mmengine's
    `randomness`); on GPU, AMP and cuDNN autotuning are worth more than bitwise repeats.
    """
    p = recipe
    if p.batch_size % world_size:
        raise ValueError(f"batch {p.batch_size} does not split over {world_size} devices")
    ade_root = Path(ade_root)
    iters = run_iterations(p, fraction)
    train_pipe, test_pipe = _pipelines(p)
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
        randomness=dict(seed=seed, deterministic=not on_gpu),
        log_processor=dict(by_epoch=False),
        log_level="INFO",
        visualizer=dict(type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")]),
    )
