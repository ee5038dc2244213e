"""Torch datasets over the ImageNet-style and ADE20K-style layouts, read through manifests.

Augmentation randomness comes only from (seed, epoch, index), never from global RNG state, so
every arm of a study sees identical crops and flips regardless of worker count or order
(docs/protocol.md rule 2).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dbp.config import DataError
from dbp.subset import ade_pair, list_ade_stems

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError)  # what PIL raises on broken files


def check_readable(root: str | Path, rel_paths: Sequence[str]) -> list[str]:
    """The entries whose file is missing or has no valid image header.

    Cheap (no full decode): meant to fail early, before the clock starts, not to catch every
    truncated file; ImageFolderDataset's on_error handles the rest.
    """
    bad = []
    for rel in rel_paths:
        try:
            with Image.open(Path(root) / rel) as im:
                im.verify()
        except _DECODE_ERRORS:
            bad.append(rel)
    return bad


def random_resized_crop(rng: np.random.Generator, width: int, height: int,
                        scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) as torchvision's RandomResizedCrop samples it, from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    # fallback: centre crop with the aspect ratio clamped into `ratio`
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def normalise(img: Image.Image | np.ndarray) -> torch.Tensor:
    """CHW float32 with ImageNet mean/std (what pre-training feeds the encoder)."""
    x = (np.asarray(img, np.float32) / 255 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


class ImageFolderDataset(Dataset):
    """Images of an ImageNet-style folder for MAE; items are (normalised CHW tensor, index).

    train: RandomResizedCrop(image_size, scale=(0.2, 1)), bicubic, then a horizontal flip with
    p = 0.5, seeded per sample by (seed, epoch, index); call `set_epoch` before each epoch (in
    the main process, with non-persistent DataLoader workers, so workers get the new state).
    val: bicubic resize to image_size, nothing random.
    on_error="skip" replaces an unreadable image by the next readable one, warns once per file,
    and counts it in `skipped`. The marks live in one shared-memory byte per file, so what
    DataLoader worker processes find is counted in the main process too (and seen by the
    other workers and later epochs).
    cache=True keeps every decoded image (before augmentation) for the dataset's lifetime: on
    small data a run decodes each file once, not once per epoch (decoding is ~45 % of the
    loading cost of the embedded data). Each DataLoader worker would hold its own copy.
    """

    def __init__(self, root: str | Path, rel_paths: Sequence[str], image_size: int, train: bool,
                 on_error: str = "raise", cache: bool = False) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = Path(root)
        self.rel_paths = list(rel_paths)
        self.image_size = image_size
        self.train = train
        self.on_error = on_error
        self._bad = torch.zeros(len(self.rel_paths), dtype=torch.uint8).share_memory_()
        self._epoch_seed: tuple[int, int] | None = None
        self._decoded: dict[int, Image.Image] | None = {} if cache else None

    @property
    def skipped(self) -> int:
        """Number of distinct unreadable files replaced so far."""
        return int(self._bad.sum())

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Fix the augmentation stream: sample i of this epoch uses RNG(seed, epoch, i)."""
        self._epoch_seed = (epoch, seed)

    def __len__(self) -> int:
        return len(self.rel_paths)

    def _load(self, index: int) -> Image.Image:
        if self._decoded is not None and index in self._decoded:
            return self._decoded[index]
        path = self.root / self.rel_paths[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except _DECODE_ERRORS as e:
            raise OSError(f"unreadable image {path}: {e}") from e
        if self._decoded is not None:
            self._decoded[index] = img
        return img

    def _load_or_substitute(self, index: int) -> Image.Image:
        for k in range(len(self)):
            j = (index + k) % len(self)
            if self._bad[j]:
                continue
            try:
                return self._load(j)
            except OSError as e:
                if self.on_error == "raise":
                    raise DataError(f"{e}; fix it or set data.on_error: skip") from None
                self._bad[j] = 1
                warnings.warn(f"skipping {e}", RuntimeWarning, stacklevel=3)
        raise OSError(f"no readable image among {len(self)} files under {self.root}")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self._load_or_substitute(index)
        size = (self.image_size, self.image_size)
        if not self.train:
            return normalise(img.resize(size, Image.BICUBIC)), index
        if self._epoch_seed is None:
            raise RuntimeError("call set_epoch(epoch, seed) before reading training samples")
        epoch, seed = self._epoch_seed
        rng = np.random.default_rng([seed, epoch, index])
        img = img.resize(size, Image.BICUBIC, box=random_resized_crop(rng, *img.size))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalise(img), index


IGNORE_LABEL = 255  # ADE's raw annotations: 0 unlabelled, 1..K the classes, 255 ignored


def annotation_problem(img_path: Path, ann_path: Path, num_classes: int) -> str | None:
    """What is wrong with one image/annotation pair, or None: the annotation must be one
    channel of 8-bit labels, the image's size, with values in 0..num_classes or 255. Reads the
    image's header only and one pass over the label values."""
    try:
        with Image.open(img_path) as im:
            size = im.size
    except _DECODE_ERRORS as e:
        return f"{img_path}: unreadable image ({e})"
    try:
        with Image.open(ann_path) as an:
            if an.mode not in ("L", "P"):
                return f"{ann_path}: {an.mode} annotation, not single-channel 8-bit labels (mode L or P)"
            if an.size != size:
                return f"{ann_path}: annotation {an.size[0]}x{an.size[1]}, image {size[0]}x{size[1]}"
            counts = np.bincount(np.asarray(an).ravel(), minlength=256)
    except _DECODE_ERRORS as e:
        return f"{ann_path}: unreadable annotation ({e})"
    bad = [int(v) for v in np.flatnonzero(counts) if num_classes < v != IGNORE_LABEL]
    if bad:
        return (f"{ann_path}: labels {bad[:5]} outside 0..{num_classes} (the class list) and "
                f"{IGNORE_LABEL} (ignore)")
    return None


def check_pairs(root: str | Path, train_stems: Sequence[str]) -> None:
    """A downstream run's data, checked before it trains: its training pairs and the whole
    validation split (what fine-tuning and the probe evaluate on). DataError with one line
    per bad file, so a wrong label is never silently left out of mIoU or met mid-run."""
    classes = len(read_class_names(root))
    pairs = [ade_pair(root, split, s) for split, stems in
             (("training", train_stems), ("validation", list_ade_stems(root, "validation"))) for s in stems]
    problems = [p for p in (annotation_problem(img, ann, classes) for img, ann in pairs) if p]
    if problems:
        raise DataError(f"{len(problems)} of {len(pairs)} annotations under {root} fail their "
                        f"check:\n" + "\n".join(problems))


def read_class_names(ade_root: str | Path) -> list[str]:
    """Class names from objectInfo150.txt (one row per class after the header)."""
    lines = (Path(ade_root) / "objectInfo150.txt").read_text().splitlines()[1:]
    return [line.split("\t", 4)[4] for line in lines if line.strip()]


def reduce_zero(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label on uint8: 0 (unlabelled) -> 255 (ignore), k -> k - 1, 255 stays."""
    out = label.astype(np.uint8) - np.uint8(1)  # wraps 0 -> 255
    out[out == 254] = 255
    return out


class ADESegDataset(Dataset):
    """(image HxWx3 uint8, label HxW uint8) pairs of an ADE20K-style split, for tests and checks.

    `rel_stems` is an ADE subset manifest (stems, as mmseg's ann_file); default: the whole split.
    `num_classes` and `classes` come from objectInfo150.txt, never a hard-coded 150.
    """

    def __init__(self, root: str | Path, split: str, rel_stems: Sequence[str] | None = None,
                 reduce_zero_label: bool = True) -> None:
        self.root = Path(root)
        self.split = split
        self.stems = list_ade_stems(root, split) if rel_stems is None else list(rel_stems)
        self.reduce_zero_label = reduce_zero_label
        self.classes = read_class_names(root)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, ann_path = ade_pair(self.root, self.split, self.stems[index])
        with Image.open(img_path) as im:
            img = np.asarray(im.convert("RGB"))
        with Image.open(ann_path) as an:
            label = np.asarray(an)
        if label.shape != img.shape[:2]:
            raise ValueError(f"{ann_path}: label {label.shape} does not match image {img.shape[:2]}")
        return img, (reduce_zero(label) if self.reduce_zero_label else label)
