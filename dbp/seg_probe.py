"""Linear segmentation probe of a frozen encoder: the downstream measure that tells encoders apart.

On the embedded data, UperNet fine-tuned from random init scores as well as UperNet fine-tuned
from a pre-trained encoder (docs/downstream.md), so fine-tuning mIoU cannot separate encoders:
the decoder and the encoder's own updates learn what pre-training would have given. A head
that learns no features of its own can only read out what the encoder already computes.

The encoder (an export, or a seeded random init for "scratch") stays frozen and runs once over
a fixed sample of training images and over every validation image, each image cut into tiles
of the encoder's input size. The chosen blocks' outputs are concatenated per patch and
standardised per feature with the training patches' statistics (MAE's linear probe: BatchNorm
without affine), and a linear head starting at zero is trained by AdamW against each patch's
class frequencies, for a fixed number of steps. With `whiten` the features are whitened
instead (ZCA on the training patches): the score is then blind to a better- or
worse-conditioned feature basis, the check that decorrelation's effect on conditioning does
not pass for better features. Each head is scored per pixel on the validation images (logits
upsampled bilinearly): mIoU and per-class IoU as mmseg counts them. On CPU the same encoder,
data, settings and seed give the same score.
"""
from __future__ import annotations

from dbp._compat import mm_shims

mm_shims()  # before mmcv, mmengine and mmseg (see dbp._compat)

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dbp.config import ProbeConfig
from dbp.datasets import ADESegDataset, check_pairs, normalise, read_class_names
from dbp.export import build_backbone
from dbp.presets import PRESETS
from dbp.provenance import provenance
from dbp.records import atomic_write_json
from dbp.seg_recipe import out_indices
from dbp.segment import by_name, pretrained_info, previous_run, run_digest
from dbp.subset import list_ade_stems, manifest_hash, spread_sample

IGNORE = 255
# Whitening adds this share of the mean eigenvalue to every eigenvalue, so that the near-null
# directions of random-init features are not blown up into noise.
SHRINK = 1e-3
WEIGHT_DECAY = 1e-4
FORWARD_BATCH, SCORE_BATCH = 256, 64  # encoder tiles per forward pass, images per scoring chunk


@dataclass(frozen=True)
class Split:
    """Images (N, 3, S, S), normalised as in pre-training, and labels (N, S, S), IGNORE unlabelled."""
    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class ProbeData:
    """What the encoders are probed on, loaded once for all of them: a fixed sample of the
    training images (the same for every arm and seed) and every validation image."""
    train: Split
    val: Split
    classes: list[str]
    fingerprint: dict[str, Any]  # the folder and the sample: part of every probe's digest


def load_probe_data(data_root: str | Path, settings: ProbeConfig, model_name: str) -> ProbeData:
    """The probe's images of an ADE-layout folder, each resized to `settings.tiles` x
    `settings.tiles` inputs of the encoder."""
    ade = Path(data_root)
    stems = spread_sample(list_ade_stems(ade, "training"), settings.train_images, seed=0)
    side = settings.tiles * PRESETS[model_name]["img_size"]
    check_pairs(ade, stems)
    return ProbeData(load_split(ade, "training", stems, side), load_split(ade, "validation", None, side),
                     read_class_names(ade),
                     {"data_root": str(ade.resolve()), "train_stems_hash": manifest_hash(stems)})


def load_split(ade: Path, split: str, stems: list[str] | None, side: int) -> Split:
    """An ADE-layout split (all stems, or `stems`), each image resized to side x side
    (bicubic; labels nearest) unless it is that size already, as the embedded mosaics are."""
    ds = ADESegDataset(ade, split, stems)
    images, labels = [], []
    for img, lab in (ds[i] for i in range(len(ds))):
        if img.shape[:2] != (side, side):
            img = np.asarray(Image.fromarray(img).resize((side, side), Image.BICUBIC))
            lab = np.asarray(Image.fromarray(lab).resize((side, side), Image.NEAREST))
        images.append(normalise(img))
        labels.append(torch.from_numpy(lab.astype(np.int64)))
    return Split(torch.stack(images), torch.stack(labels))


@torch.no_grad()
def tiled_features(backbone: nn.Module, images: Tensor, size: int) -> Tensor:
    """(N, D, h, w): the backbone's outputs (every out_indices block, concatenated) over the
    images cut into size x size tiles, put back in place."""
    n, c, side, _ = images.shape
    t = side // size
    tiles = images.reshape(n, c, t, size, t, size).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, size, size)
    feats = torch.cat([torch.cat(backbone(tiles[i:i + FORWARD_BATCH]), 1)
                       for i in range(0, len(tiles), FORWARD_BATCH)])
    d, g = feats.shape[1], feats.shape[-1]
    return feats.reshape(n, t, t, d, g, g).permute(0, 3, 1, 4, 2, 5).reshape(n, d, t * g, t * g)


def _tokens(feats: Tensor) -> Tensor:
    """(N, D, h, w) -> (N h w, D), one row per patch, images in order, patches row-major."""
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


def patch_targets(labels: Tensor, patch: int, num_classes: int) -> Tensor:
    """(N h w, K): each patch's class frequencies over its labelled pixels (rows of zeros for a
    patch without any)."""
    n, side, _ = labels.shape
    g = side // patch
    onehot = F.one_hot(labels.masked_fill(labels == IGNORE, num_classes), num_classes + 1)[..., :num_classes]
    counts = onehot.reshape(n, g, patch, g, patch, num_classes).sum((2, 4)).reshape(-1, num_classes)
    return counts.float() / counts.sum(1, keepdim=True).clamp_min(1)


def normaliser(tokens: Tensor, whiten: bool) -> Callable[[Tensor], Tensor]:
    """The map that gives `tokens` zero mean and unit variance per feature, or with `whiten`
    identity covariance (ZCA fitted in float64, eigenvalues shrunk by SHRINK)."""
    if not whiten:
        std, mean = torch.std_mean(tokens, dim=0)
        return lambda x: (x - mean) / std.clamp_min(1e-6)
    x = tokens.double()
    mean = x.mean(0)
    eigval, eigvec = torch.linalg.eigh((x - mean).T @ (x - mean) / len(x))
    eigval = eigval.clamp_min(0) + SHRINK * eigval.clamp_min(0).mean()
    w = (eigvec @ torch.diag(eigval.rsqrt()) @ eigvec.T).float()
    return lambda x: (x - mean.float()) @ w


def head_generator(seed: int, head: int) -> torch.Generator:
    """The batch order of head `head` of encoder seed `seed`: the same for every arm of a seed
    (paired), independent across heads."""
    state = np.random.SeedSequence([seed, head]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def train_head(x: Tensor, targets: Tensor, settings: ProbeConfig, generator: torch.Generator) -> nn.Linear:
    """A linear head from zero, AdamW on random batches of patches, one-cycle lr."""
    head = nn.Linear(x.shape[1], targets.shape[1]).to(x.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.steps,
                                                pct_start=0.1, cycle_momentum=False)
    for _ in range(settings.steps):
        i = torch.randint(0, len(x), (settings.batch_tokens,), generator=generator).to(x.device)
        loss = F.cross_entropy(head(x[i]), targets[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head


@torch.no_grad()
def confusion(head: nn.Linear, x: Tensor, labels: Tensor) -> Tensor:
    """(K, K) pixel counts (true, predicted) of the head's predictions, upsampled bilinearly,
    on the labelled pixels; `x` (N, h, w, D) holds the images' normalised patches."""
    k, side = head.out_features, labels.shape[-1]
    logits = head(x).permute(0, 3, 1, 2)
    pred = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False).argmax(1).cpu()
    keep = labels != IGNORE
    return torch.bincount(labels[keep] * k + pred[keep], minlength=k * k).reshape(k, k)


def iou_summary(cm: Tensor) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU) from a confusion matrix, as mmseg's IoUMetric counts them: a class
    absent from labels and predictions is NaN and left out of the mean."""
    c = cm.double().numpy()
    inter = np.diag(c)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (c.sum(0) + c.sum(1) - inter)
    return float(np.nanmean(iou)), iou


def probe_backbone(backbone: nn.Module, data: ProbeData, *, settings: ProbeConfig, seed: int,
                   size: int, patch: int) -> dict[str, Any]:
    """Probe a frozen backbone (eval mode, weights untouched): the training patches' features
    once, one head per head seed trained on them, then every head scored on the validation
    images, whose features are made a chunk at a time (bounded memory at any data size)."""
    backbone.eval()  # mmseg's BEiT.train() returns None: not chainable
    backbone.requires_grad_(False)
    device = next(backbone.parameters()).device
    train, val, k = data.train, data.val, len(data.classes)
    feats = _tokens(tiled_features(backbone, train.images.to(device), size))
    targets = patch_targets(train.labels, patch, k).to(device)
    labelled = targets.sum(1) > 0
    norm = normaliser(feats[labelled], settings.whiten)
    x_train = norm(feats[labelled])
    heads = [train_head(x_train, targets[labelled], settings, head_generator(seed, h))
             for h in range(settings.heads)]
    cms = [torch.zeros(k, k, dtype=torch.int64) for _ in heads]
    for i in range(0, len(val.labels), SCORE_BATCH):
        feats = tiled_features(backbone, val.images[i:i + SCORE_BATCH].to(device), size)
        x = norm(feats.permute(0, 2, 3, 1))
        for cm, head in zip(cms, heads):
            cm += confusion(head, x, val.labels[i:i + SCORE_BATCH])
    scores = [iou_summary(cm) for cm in cms]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class NaN for every head stays NaN
        per_class = np.nanmean(np.stack([iou for _, iou in scores]), axis=0)
    total = torch.stack(cms).sum(0).double()
    return {"mIoU": float(np.mean([m for m, _ in scores])), "mIoU_heads": [m for m, _ in scores],
            "aAcc": float(total.diag().sum() / total.sum()),
            "per_class_iou": by_name(data.classes, per_class),
            "feature_dim": int(x_train.shape[1]), "train_patches": int(labelled.sum())}


def _backbone(model_name: str, pretrained: Path | None, blocks: tuple[int, ...], seed: int) -> nn.Module:
    """The mmseg MAE backbone tapping `blocks`, from the export or (scratch) from mmseg's init
    drawn with `seed`; the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_backbone(model_name, checkpoint=pretrained, out_indices=blocks)


def probe(out_dir: str | Path, *, data: ProbeData, settings: ProbeConfig, pretrained: str | Path | None,
          seed: int, model_name: str, resolved_config: dict | None) -> dict[str, Any]:
    """Probe one encoder (an export, or None for the random-init "scratch" arm); writes and
    returns `out_dir/metrics.json`.

    A finished probe in `out_dir` with the same settings, data, seed and encoder bytes is
    returned as is; one made otherwise is discarded. The export is checked (exists, mmseg
    loads every weight) before anything runs.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    pretrained = Path(pretrained) if pretrained is not None else None
    pre = pretrained_info(pretrained, model_name)
    preset = PRESETS[model_name]
    blocks = settings.blocks or out_indices(preset["depth"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = {"recipe": settings.recipe(), "blocks": list(blocks), "model_name": model_name, "seed": seed,
            **data.fingerprint, "device": device.type}
    digest = run_digest(plan, pretrained)
    done = previous_run(out, digest, "probe")
    if done is not None:
        return done
    info = {**pre, "seed": seed, "status": "running", "run_digest": digest, "plan": plan,
            "config": resolved_config, "provenance": provenance()}
    atomic_write_json(out / "run.json", info)
    backbone = _backbone(model_name, pretrained, tuple(blocks), seed).to(device)
    result = probe_backbone(backbone, data, settings=settings, seed=seed, size=preset["img_size"],
                            patch=preset["patch_size"])
    metrics = {**result, "arm": pre["arm"], "seed": seed, "heads": settings.heads, "steps": settings.steps,
               "blocks": list(blocks), "features": "whitened" if settings.whiten else "standardised",
               "train_images": len(data.train.labels), "val_images": len(data.val.labels),
               "num_classes": len(data.classes), "seconds": time.perf_counter() - start}
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "run.json", {**info, "status": "finished"})
    return metrics
