"""Embedded default data: ImageNet-style photo crops and ADE20K-style real-texture mosaics.

With no network, and no installable package shipping natural images with segmentation masks
(PyPI wheels and Debian packages hold single examples at most), both datasets are composed
from the photos bundled in the scikit-image wheel. They use the real datasets' on-disk
layouts, so the same readers (dbp.subset, dbp.datasets) serve real and embedded data.

- Determinism: everything is drawn from numpy generators seeded by `seed`. MANIFEST.json hashes
  the decoded uint8 arrays, because JPEG bytes differ between libjpeg builds.
- No leakage: the right-most HOLDOUT share of every photo's columns feeds validation only, in
  both datasets, so no validation pixel is ever seen in pre-training or fine-tuning.
- Atomic and cached: built in `<root>.tmp-<pid>`, then renamed; a matching root is reused.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from dbp.subset import list_images

VERSION = "embedded-v1"
HOLDOUT = 0.25  # right-most share of each photo's columns, reserved for validation
JPEG_QUALITY = 90
ATLAS_VARIANTS = 8  # texture crops per class and split for the mosaics
ADE = "ADEChallengeData2016"
ADE_SPLIT = {"train": "training", "val": "validation"}
SPLITS = ("imagenet/train", "imagenet/val",
          f"{ADE}/images/training", f"{ADE}/annotations/training",
          f"{ADE}/images/validation", f"{ADE}/annotations/validation")

# skimage.data loader -> licence as its docstring states it (scikit-image 0.26). Only loaders
# whose file ships in the wheel; the pooch-downloaded ones fail offline.
SOURCES = {
    "astronaut": "public domain (NASA; 'no known copyright restrictions')",
    "brick": "CC0 (CC0Textures, Bricks25)",
    "camera": "CC0 (photographer Lav Varshney)",
    "cell": "CC0",
    "chelsea": "CC0 (photographer Stefan van der Walt)",
    "clock": "public domain (photographer Stefan van der Walt)",
    "coffee": "CC0 (photographer Rachel Michetti)",
    "coins": "no known copyright restrictions",
    "grass": "CC0 (CC0Textures)",
    "gravel": "CC0 (CC0Textures, Gravel04)",
    "hubble_deep_field": "public domain (NASA)",
    "immunohistochemistry": "no known copyright restrictions",
    "microaneurysms": "CC0 (Andreas Maier)",
    "moon": "not stated in the loader",
    "page": "not stated in the loader",
    "retina": "CC0 1.0",
    "rocket": "public domain (SpaceX)",
    "stereo_motorcycle": "not stated in the loader (Middlebury 2014 stereo; left view used)",
    "text": "public domain ('no known copyright restrictions')",
}
_STREAM = {"imagenet": 0, "atlas": 1, "ade": 2}


def _rng(seed: int, stream: str, split: str, *keys: int) -> np.random.Generator:
    """An independent generator per (stream, split, keys): changing one count moves no other part."""
    return np.random.default_rng([seed, _STREAM[stream], ("train", "val").index(split), *keys])


def load_sources() -> dict[str, np.ndarray]:
    """Bundled photos by loader name (sorted), as HxWx3 uint8; grey replicated to RGB."""
    import skimage.data

    photos = {}
    for name in sorted(SOURCES):
        im = getattr(skimage.data, name)()
        im = np.asarray(im[0] if isinstance(im, tuple) else im)  # stereo pair: left view
        photos[name] = np.ascontiguousarray(np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im[..., :3])
    return photos


def split_columns(width: int, split: str) -> tuple[int, int]:
    """Column range [x0, x1) that `split` may crop from: val is the right-most HOLDOUT share."""
    cut = width - max(1, round(width * HOLDOUT))
    return (cut, width) if split == "val" else (0, cut)


def crop_box(rng: np.random.Generator, shape: tuple[int, ...], split: str, side: int) -> tuple[int, int, int]:
    """(y, x, side) of a square crop inside the split's columns; side shrinks to fit small photos."""
    x0, x1 = split_columns(shape[1], split)
    side = min(side, shape[0], x1 - x0)
    return int(rng.integers(0, shape[0] - side + 1)), int(rng.integers(x0, x1 - side + 1)), side


def _crop(rng: np.random.Generator, photo: np.ndarray, split: str, lo: int, hi: int, out: int) -> np.ndarray:
    """A random square crop of side lo..hi from the split's columns, resized to out x out (bicubic)."""
    y, x, s = crop_box(rng, photo.shape, split, int(rng.integers(lo, hi + 1)))
    return np.asarray(Image.fromarray(photo[y:y + s, x:x + s]).resize((out, out), Image.BICUBIC))


def class_names(photos: dict[str, np.ndarray]) -> list[str]:
    """ImageFolder class folders: an index prefix keeps the order stable (`c00_astronaut`)."""
    return [f"c{i:02d}_{n}" for i, n in enumerate(photos)]


def _save(arr: np.ndarray, path: Path) -> None:
    """JPEG for photos (as the real datasets), PNG for labels (lossless)."""
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(arr).save(path, quality=JPEG_QUALITY)
    else:
        Image.fromarray(arr).save(path)


def _write_photo_crops(out: Path, photos: dict[str, np.ndarray], seed: int, split: str,
                       per_class: int, size: int) -> None:
    """`imagenet/<split>/<class>/` with per_class crops of side size/2..3size/2 per photo."""
    for c, (cls, photo) in enumerate(zip(class_names(photos), photos.values())):
        rng = _rng(seed, "imagenet", split, c)
        folder = out / "imagenet" / split / cls
        folder.mkdir(parents=True)
        for k in range(per_class):
            name = (f"{cls}_{k + 1:06d}.JPEG" if split == "train"
                    else f"ILSVRC2012_val_{c * per_class + k + 1:08d}.JPEG")  # as after valprep
            _save(_crop(rng, photo, split, size // 2, size * 3 // 2, size), folder / name)


def build_atlas(photos: dict[str, np.ndarray], seed: int, split: str, size: int) -> np.ndarray:
    """(K, V, S, S, 3) texture crops, S = 1.5 size, from the split's columns only.

    Crops are made once and reused by every mosaic: cutting from the photos per region is slow.
    """
    s = size * 3 // 2
    rng = _rng(seed, "atlas", split)
    return np.stack([np.stack([_crop(rng, p, split, s, 3 * s, s) for _ in range(ATLAS_VARIANTS)])
                     for p in photos.values()])


def _fnoise(rng: np.random.Generator, h: int, w: int, alpha: float) -> np.ndarray:
    """1/f^alpha noise with unit std: smooth random borders and blob shapes."""
    f = np.hypot(np.fft.rfftfreq(w)[None, :], np.fft.fftfreq(h)[:, None])
    f[0, 0] = 1
    spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f ** (alpha / 2)
    spec[0, 0] = 0
    x = np.fft.irfft2(spec, s=(h, w))
    return x / (x.std() + 1e-8)


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean mask: a rotated ellipse or a thresholded low-pass noise blob (half each)."""
    yy, xx = np.mgrid[0:size, 0:size]
    if rng.random() < 0.5:
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        ry, rx = rng.uniform(0.1, 0.35, 2) * size
        a = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        return (u / rx) ** 2 + (v / ry) ** 2 < 1
    n = _fnoise(rng, size, size, 4.0)
    return n > np.quantile(n, rng.uniform(0.6, 0.9))


def mosaic(rng: np.random.Generator, atlas: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: 1-3 wavy bands, then 1-5 blobs, each region textured by one class.

    Returns image (size x size x 3 uint8) and label (uint8, class id 1..K, 0 on the 1-px borders
    between classes, like ADE20K's unlabelled pixels).
    """
    k, v, s = atlas.shape[:3]

    def texture(c: int) -> np.ndarray:
        t = atlas[c, rng.integers(v)]
        y, x = rng.integers(0, s - size + 1, 2)
        t = t[y:y + size, x:x + size]
        return t[:, ::-1] if rng.random() < 0.5 else t

    img = np.zeros((size, size, 3), np.uint8)
    lab = np.zeros((size, size), np.uint8)
    nb = int(rng.integers(1, 4))
    cuts = np.sort(rng.uniform(0.2, 0.8, nb - 1)) * size
    wave = _fnoise(rng, 1, size, 3.0)[0] * size * 0.05
    band = np.searchsorted(cuts, np.arange(size)[:, None] - wave[None, :])
    regions = [(int(c), band == i) for i, c in enumerate(rng.choice(k, nb, replace=False))]
    regions += [(int(rng.integers(k)), _blob(rng, size)) for _ in range(int(rng.integers(1, 6)))]
    for c, m in regions:
        img[m] = texture(c)[m]
        lab[m] = c + 1
    edge = np.zeros_like(lab, bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    lab[edge] = 0
    return img, lab


def _write_mosaics(out: Path, atlas: np.ndarray, seed: int, split: str, n: int,
                   size: int) -> tuple[np.ndarray, np.ndarray]:
    """n image/annotation pairs; returns per-id pixel counts and image counts (for objectInfo)."""
    rng = _rng(seed, "ade", split)
    img_dir, ann_dir = (out / ADE / kind / ADE_SPLIT[split] for kind in ("images", "annotations"))
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    pixels = np.zeros(len(atlas) + 1, np.int64)
    images = np.zeros(len(atlas) + 1, np.int64)
    for i in range(1, n + 1):
        img, lab = mosaic(rng, atlas, size)
        stem = f"ADE_{split}_{i:08d}"
        _save(img, img_dir / f"{stem}.jpg")
        _save(lab, ann_dir / f"{stem}.png")
        counts = np.bincount(lab.ravel(), minlength=len(atlas) + 1)
        pixels += counts
        images += counts > 0
    return pixels, images


def _object_info(names: list[str], train: tuple[np.ndarray, np.ndarray],
                 val: tuple[np.ndarray, np.ndarray]) -> str:
    """objectInfo150.txt as in ADE20K: K rows; Ratio = training pixel share, Train/Val = images."""
    (pixels, n_train), (_, n_val) = train, val
    rows = [f"{i}\t{pixels[i] / pixels.sum():.4f}\t{n_train[i]}\t{n_val[i]}\t{n}"
            for i, n in enumerate(names, 1)]
    return "Idx\tRatio\tTrain\tVal\tName\n" + "\n".join(rows) + "\n"


def _licences(photos: dict[str, np.ndarray]) -> str:
    rows = [f"| {c} | `skimage.data.{n}()` | {SOURCES[n]} |" for c, n in zip(class_names(photos), photos)]
    return "\n".join([
        "# Licences of the embedded data sources",
        "",
        "Every image here is a crop or a mosaic of crops of these photos, bundled in the",
        "scikit-image wheel. Licences are as stated in each loader's docstring; \"not stated\"",
        "means the loader gives none (the photos ship with scikit-image, BSD-3-Clause).",
        "",
        "| class | source | licence |",
        "|---|---|---|",
        *rows, ""])


def split_digests(root: str | Path) -> dict[str, dict]:
    """Per split: file count and sha256 over (relative path, shape, decoded uint8 pixels)."""
    digests = {}
    for split in SPLITS:
        h = hashlib.sha256()
        paths = list_images(root, split)
        for rel in paths:
            with Image.open(Path(root) / rel) as im:
                arr = np.asarray(im)
            h.update(f"{rel}\n{arr.shape}\n".encode())
            h.update(arr.tobytes())
        digests[split] = {"files": len(paths), "sha256": h.hexdigest()}
    return digests


def _check_existing(root: Path, params: dict) -> None:
    """Return quietly if `root` holds the dataset `params` describe; raise naming it otherwise."""
    try:
        old = json.loads((root / "MANIFEST.json").read_text())
    except (OSError, ValueError) as e:
        raise FileExistsError(f"{root} exists but is not an embedded dataset "
                              "(no readable MANIFEST.json)") from e
    diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
    if diff:
        raise FileExistsError(f"{root} holds a different embedded dataset (found, wanted): {diff}; "
                              "use another root or delete it")


def _build(out: Path, params: dict, log: Callable[[str], None]) -> None:
    """Write the whole dataset into `out` (a fresh temp dir), MANIFEST.json last."""
    seed, size = params["seed"], params["image_size"]
    counts = params["counts"]
    photos = load_sources()
    log(f"loaded {len(photos)} photos")
    for split in ("train", "val"):
        _write_photo_crops(out, photos, seed, split, counts[f"imagenet_{split}_per_class"], size)
        log(f"imagenet/{split} written")
    stats = {}
    for split in ("train", "val"):
        stats[split] = _write_mosaics(out, build_atlas(photos, seed, split, size), seed, split,
                                      counts[f"ade_{split}"], size)
        log(f"{ADE}/{ADE_SPLIT[split]} written")
    (out / ADE / "objectInfo150.txt").write_text(
        _object_info(list(photos), stats["train"], stats["val"]))
    (out / "LICENSES.md").write_text(_licences(photos))
    manifest = {
        **params,
        "generator": "dbp.embedded",
        "holdout": f"right-most {HOLDOUT:.0%} of every source's columns: validation crops only",
        "sources": [{"class": c, "loader": f"skimage.data.{n}", "shape": list(p.shape),
                     "licence": SOURCES[n]} for c, (n, p) in zip(class_names(photos), photos.items())],
        "packages": {p: importlib.metadata.version(p) for p in ("scikit-image", "pillow", "numpy")},
        "splits": split_digests(out),
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log("hashed")


def make_embedded(root: str | Path, seed: int = 0, *, imagenet_per_class: int = 200,
                  imagenet_val_per_class: int = 20, ade_train: int = 1000, ade_val: int = 200,
                  image_size: int = 64, progress: bool = False) -> Path:
    """Make (or reuse) the embedded dataset at `root`; returns `root`.

    An existing root with the same version, seed, counts and size is a cache hit; any other
    existing root raises FileExistsError rather than being overwritten.
    """
    root = Path(root)
    params = {"version": VERSION, "seed": seed, "image_size": image_size,
              "counts": {"imagenet_train_per_class": imagenet_per_class,
                         "imagenet_val_per_class": imagenet_val_per_class,
                         "ade_train": ade_train, "ade_val": ade_val}}
    if root.exists():
        _check_existing(root, params)
        return root
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[embedded {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _build(tmp, params, log)
        try:
            tmp.rename(root)
        except OSError:  # another process finished the same root first
            if not root.exists():
                raise
            _check_existing(root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
