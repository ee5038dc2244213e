"""Seeded subset manifests over ImageNet-style and ADE20K-style folders.

A manifest is a text file of paths (or ADE stems), one per line. Every arm of a study reads the
same manifest, and its hash goes into each run's provenance, so "same data" is checkable.
Subsets depend only on (seed, the sorted list), never on directory order or global RNG state.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import os
import posixpath
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def list_images(root: str | Path, split: str) -> list[str]:
    """Sorted image paths under `root/split`, relative to `root` (POSIX separators).

    Recurses, so it serves ImageNet's `train/<class>/*.JPEG` and ADE's flat `images/training`.
    Follows symlinks because large datasets are often linked in.
    """
    root = Path(root)
    base = root / split
    if not base.is_dir():
        raise FileNotFoundError(f"no image folder {base}")
    found = []
    for dirpath, _, files in os.walk(base, followlinks=True):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        found += [f"{rel_dir}/{f}" for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def ade_pair(root: str | Path, split: str, stem: str) -> tuple[Path, Path]:
    """Image and annotation path of one ADE stem (mmseg's img_dir / ann_dir convention)."""
    root = Path(root)
    return root / "images" / split / f"{stem}.jpg", root / "annotations" / split / f"{stem}.png"


def list_ade_stems(root: str | Path, split: str) -> list[str]:
    """Sorted stems of `images/<split>`; raises naming any image without an annotation.

    Stems are what mmseg's `ann_file` lists, so an ADE subset manifest can be passed to it as is.
    """
    stems = [posixpath.splitext(posixpath.basename(p))[0]
             for p in list_images(root, f"images/{split}")]
    missing = [str(ann) for ann in (ade_pair(root, split, s)[1] for s in stems) if not ann.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} ADE image(s) lack an annotation, e.g. {missing[0]}")
    return stems


def _take(n: int, fraction: float) -> int:
    """round(fraction * n) with halves up, at least 1 when n > 0 (an empty subset is useless)."""
    return min(n, max(1, math.floor(fraction * n + 0.5))) if n else 0


def sample_subset(paths: Sequence[str], fraction: float, seed: int,
                  class_balanced: bool = False) -> list[str]:
    """A sorted, seeded subset of `paths` with round(fraction * n) entries.

    The input is sorted first, so the result depends only on (seed, the set of paths). For one
    seed a smaller fraction gives a subset of a larger one (prefix of one permutation).
    `class_balanced` applies the fraction within each parent folder (the ImageNet class), with
    at least one path per class.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got fraction={fraction!r}")
    rng = np.random.default_rng(seed)
    if not class_balanced:
        groups = [sorted(paths)]
    else:
        by_class: dict[str, list[str]] = {}
        for p in sorted(paths):
            by_class.setdefault(posixpath.dirname(p), []).append(p)
        groups = [by_class[c] for c in sorted(by_class)]
    chosen = []
    for g in groups:
        chosen += [g[i] for i in rng.permutation(len(g))[:_take(len(g), fraction)]]
    return sorted(chosen)


def spread_sample(paths: Sequence[str], n: int | None, seed: int = 0) -> list[str]:
    """n of `paths` spread over their classes (parent folders), sorted; all when n is None.

    Round-robin over the sorted classes, each class in its own order (a permutation by
    default_rng(seed), so it depends on that class's files only), so a small set still covers
    every class instead of the first few (the sorted list's first N would). `seed` is fixed,
    not the run's, so every arm and seed of a study sees the same set.
    """
    if n is None:
        return sorted(paths)
    by_class: dict[str, list[str]] = {}
    for p in sorted(paths):
        by_class.setdefault(posixpath.dirname(p), []).append(p)
    orders = [[g[i] for i in np.random.default_rng(seed).permutation(len(g))]
              for g in (by_class[c] for c in sorted(by_class))]
    rounds = [p for rnd in itertools.zip_longest(*orders) for p in rnd if p is not None]
    return sorted(rounds[:n])


def manifest_hash(rel_paths: Sequence[str]) -> str:
    """sha256 of the newline-joined list (order matters; subsets are sorted)."""
    return hashlib.sha256("\n".join(rel_paths).encode()).hexdigest()


def write_manifest(path: str | Path, rel_paths: Sequence[str]) -> None:
    """Write one path per line via a temp file and rename, so a killed job leaves no half list."""
    bad = [p for p in rel_paths if not p or "\n" in p or "\r" in p]
    if bad:
        raise ValueError(f"manifest entries must be non-empty single lines, got {bad[0]!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(f"{p}\n" for p in rel_paths), encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(path: str | Path) -> list[str]:
    """The entries of a manifest written by `write_manifest` (blank lines ignored)."""
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
