"""Pre-training data for one run: the seeded train subset and the fixed validation set.

The embedded default and a real ImageNet folder go through the same code: list the images,
sample the subset by the run's seed, record its manifest and hash, check the files early.
The manifest side (`imagenet_root`, `train_manifest`; what `dbp data subset` runs) imports no
torch: only `prepare_pretrain_data` reads dbp.datasets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dbp.config import DataError
from dbp.embedded import make_embedded
from dbp.subset import (list_images, manifest_hash, read_manifest, sample_subset, spread_sample,
                        write_manifest)

if TYPE_CHECKING:
    from dbp.datasets import ImageFolderDataset


@dataclass
class TrainData:
    train: ImageFolderDataset
    val: ImageFolderDataset
    manifest_hash: str


def imagenet_root(kind: str, root: str | Path, embedded_seed: int) -> Path:
    """The ImageNet-style folder: made on demand (and cached) for the embedded default."""
    if kind == "embedded":
        return make_embedded(root, seed=embedded_seed) / "imagenet"
    return Path(root)


def train_manifest(root: Path, fraction: float, seed: int, class_balanced: bool,
                   manifest: str | Path | None = None) -> list[str]:
    """The run's training subset: read from `manifest` if given, else sampled by seed."""
    if manifest is not None:
        return read_manifest(manifest)
    return sample_subset(list_images(root, "train"), fraction, seed, class_balanced=class_balanced)


def prepare_pretrain_data(*, kind: str, root: str | Path, embedded_seed: int, fraction: float,
                          class_balanced: bool, on_error: str, val_images: int | None,
                          image_size: int, seed: int, cache_images: bool = False,
                          manifest: str | Path | None = None,
                          manifest_out: Path | None = None) -> TrainData:
    """Datasets for one run; writes the train manifest to `manifest_out` when given.

    `val_images` (None: all) are a fixed sample spread over the classes, the same for every
    arm and seed (docs/protocol.md, rule 4). `cache_images`: each image is decoded once per
    run instead of once per epoch (same pixels; the data must fit in memory).

    With on_error="raise" every file is checked before training, so a corrupt image stops
    the run at start-up with its path instead of crashing it hours later.
    """
    from dbp.datasets import ImageFolderDataset, check_readable  # torch: training side only
    folder = imagenet_root(kind, root, embedded_seed)
    train_paths = train_manifest(folder, fraction, seed, class_balanced, manifest)
    val_paths = spread_sample(list_images(folder, "val"), val_images)  # every class, fixed
    if not train_paths or not val_paths:
        raise DataError(f"{folder}: no images found under train/ or val/")
    if on_error == "raise":
        bad = check_readable(folder, train_paths + val_paths)
        if bad:
            raise DataError(f"{len(bad)} unreadable image(s) under {folder}, e.g. {bad[:3]}; "
                             "fix them or set data.on_error: skip")
    if manifest_out is not None:
        write_manifest(manifest_out, train_paths)
    def dataset(paths: list[str], train: bool) -> ImageFolderDataset:
        return ImageFolderDataset(folder, paths, image_size, train=train, on_error=on_error, cache=cache_images)
    return TrainData(train=dataset(train_paths, True), val=dataset(val_paths, False),
                     manifest_hash=manifest_hash(train_paths))
