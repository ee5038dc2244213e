"""Data room: embedded data maker, subset manifests, dataset readers (tiny data, seconds)."""
from __future__ import annotations

import hashlib
import json
import re
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dbp import embedded
from dbp.config import DataError
from dbp.datasets import (IMAGENET_MEAN, IMAGENET_STD, ADESegDataset, ImageFolderDataset,
                          check_readable)
from dbp.data import prepare_pretrain_data
from dbp.subset import (list_ade_stems, list_images, manifest_hash, read_manifest,
                        sample_subset, spread_sample, write_manifest)

TINY = dict(imagenet_per_class=3, imagenet_val_per_class=2, ade_train=5, ade_val=3, image_size=32)
K = len(embedded.SOURCES)
ADE = embedded.ADE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return embedded.make_embedded(tmp_path_factory.mktemp("data") / "embedded-v1", seed=0, **TINY)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


# ---------------------------------------------------------------- embedded data

def test_sources_load_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network blocked in test")
    monkeypatch.setattr(socket, "socket", no_network)
    photos = embedded.load_sources()
    assert list(photos) == sorted(embedded.SOURCES) and len(photos) == 19
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in photos.values())


def test_layout_and_counts(tiny):
    classes = sorted(d.name for d in (tiny / "imagenet/train").iterdir())
    assert len(classes) == K and classes[0] == "c00_astronaut"
    assert sorted(d.name for d in (tiny / "imagenet/val").iterdir()) == classes
    train, val = list_images(tiny, "imagenet/train"), list_images(tiny, "imagenet/val")
    assert len(train) == 3 * K and len(val) == 2 * K
    assert train[0] == "imagenet/train/c00_astronaut/c00_astronaut_000001.JPEG"
    assert val[0] == "imagenet/val/c00_astronaut/ILSVRC2012_val_00000001.JPEG"
    with Image.open(tiny / train[0]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))
    ade = tiny / ADE
    for split, n, prefix in (("training", 5, "ADE_train_"), ("validation", 3, "ADE_val_")):
        stems = list_ade_stems(ade, split)
        assert stems == [f"{prefix}{i:08d}" for i in range(1, n + 1)]
        assert len(list(ade.glob(f"annotations/{split}/*.png"))) == n
    with Image.open(ade / "annotations/training/ADE_train_00000001.png") as an:
        assert an.mode == "L" and an.size == (32, 32)
    info = (ade / "objectInfo150.txt").read_text().splitlines()
    assert info[0] == "Idx\tRatio\tTrain\tVal\tName" and len(info) == K + 1
    assert info[1].split("\t")[0] == "1" and info[1].split("\t")[4] == "astronaut"
    labels = np.stack([_pixels(p) for p in sorted(ade.glob("annotations/*/*.png"))])
    assert labels.min() == 0 and labels.max() <= K
    assert 0.02 < (labels == 0).mean() < 0.5  # borders only (~10-17 %), not whole regions
    assert len(np.unique(labels)) >= 6


def test_manifest_and_licences(tiny):
    m = json.loads((tiny / "MANIFEST.json").read_text())
    assert m["version"] == embedded.VERSION and m["seed"] == 0 and m["image_size"] == 32
    assert m["counts"] == {"imagenet_train_per_class": 3, "imagenet_val_per_class": 2,
                           "ade_train": 5, "ade_val": 3}
    assert [s["class"] for s in m["sources"]][:2] == ["c00_astronaut", "c01_brick"]
    assert {k: v["files"] for k, v in m["splits"].items()} == {
        "imagenet/train": 3 * K, "imagenet/val": 2 * K,
        f"{ADE}/images/training": 5, f"{ADE}/annotations/training": 5,
        f"{ADE}/images/validation": 3, f"{ADE}/annotations/validation": 3}
    assert m["splits"] == embedded.split_digests(tiny)  # re-hashing from disk agrees
    licences = (tiny / "LICENSES.md").read_text()
    assert all(f"skimage.data.{n}()" in licences for n in embedded.SOURCES)
    assert not list(tiny.parent.glob("*.tmp-*"))


def test_cache_hit_and_conflicts(tiny, tmp_path):
    before = (tiny / "MANIFEST.json").stat().st_mtime_ns
    assert embedded.make_embedded(tiny, seed=0, **TINY) == tiny
    assert (tiny / "MANIFEST.json").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match=re.escape(str(tiny))):
        embedded.make_embedded(tiny, seed=1, **TINY)
    with pytest.raises(FileExistsError, match="ade_train"):
        embedded.make_embedded(tiny, seed=0, **{**TINY, "ade_train": 6})
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="MANIFEST"):
        embedded.make_embedded(tmp_path / "other", **TINY)


def test_cli_on_a_root_holding_another_data_set_is_one_line(tiny):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "dbp", "data", "make", "--root", str(tiny), "--seed", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"dbp data: {tiny} holds a different embedded dataset")
    assert len(done.stderr.strip().splitlines()) == 1


def test_same_seed_same_arrays(tiny, tmp_path):
    digests = json.loads((tiny / "MANIFEST.json").read_text())["splits"]
    again = embedded.make_embedded(tmp_path / "a", seed=0, **TINY)
    assert json.loads((again / "MANIFEST.json").read_text())["splits"] == digests
    other = embedded.make_embedded(tmp_path / "b", seed=1, **TINY)
    other_digests = json.loads((other / "MANIFEST.json").read_text())["splits"]
    assert all(other_digests[s]["sha256"] != digests[s]["sha256"] for s in digests)


@pytest.mark.parametrize("shape", [(102, 102), (191, 384), (172, 448), (512, 512), (1411, 1411)])
def test_crop_boxes_respect_holdout(shape):
    h, w = shape
    cut = w - round(w * 0.25)
    assert embedded.split_columns(w, "train") == (0, cut) and embedded.split_columns(w, "val") == (cut, w)
    rng = np.random.default_rng(0)
    for side in (1, 16, 48, 96, 288, 5000):
        for _ in range(50):
            y, x, s = embedded.crop_box(rng, shape, "val", side)
            assert 1 <= s <= side and 0 <= y <= h - s and cut <= x and x + s <= w
            y, x, s = embedded.crop_box(rng, shape, "train", side)
            assert 1 <= s <= side and 0 <= y <= h - s and 0 <= x and x + s <= cut


def test_no_val_pixel_in_training(tmp_path, monkeypatch):
    """End to end: photos black left of the hold-out strip, white in it."""
    def photo(h: int, w: int) -> np.ndarray:
        p = np.zeros((h, w, 3), np.uint8)
        p[:, w * 3 // 4:] = 255
        return p
    fake = dict(zip(sorted(embedded.SOURCES)[:3], [photo(60, 100), photo(100, 200), photo(40, 48)]))
    monkeypatch.setattr(embedded, "load_sources", lambda: fake)
    root = embedded.make_embedded(tmp_path / "e", **TINY)
    for split, dark in (("imagenet/train", True), ("imagenet/val", False),
                        (f"{ADE}/images/training", True), (f"{ADE}/images/validation", False)):
        px = np.stack([_pixels(root / p) for p in list_images(root, split)])
        assert (px.max() < 40) if dark else (px.min() > 215), split


# ---------------------------------------------------------------- subsets and manifests

@pytest.fixture
def tree(tmp_path) -> Path:
    for cls, n in (("a", 10), ("b", 7), ("c", 3)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "train" / cls / f"{cls}{i}.{('JPEG', 'jpg', 'Png')[i % 3]}").touch()
    (tmp_path / "train/a/notes.txt").touch()
    return tmp_path


def test_list_images(tree):
    paths = list_images(tree, "train")
    assert len(paths) == 20 and paths == sorted(paths)
    assert paths[:2] == ["train/a/a0.JPEG", "train/a/a1.jpg"] and "train/a/notes.txt" not in paths
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tree, "nope")


def test_sample_subset(tree):
    paths = list_images(tree, "train")
    half = sample_subset(paths, 0.5, seed=1)
    assert half == sample_subset(paths[::-1], 0.5, seed=1) == sorted(half)
    assert len(half) == 10 and set(half) <= set(paths)
    assert half != sample_subset(paths, 0.5, seed=2)
    assert len(sample_subset(paths, 0.13, seed=1)) == 3  # round(2.6)
    assert len(sample_subset(paths, 0.01, seed=1)) == 1  # never empty
    assert set(sample_subset(paths, 0.25, seed=1)) <= set(half)  # nested for one seed
    assert sample_subset(paths, 1.0, seed=3) == paths
    for bad in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            sample_subset(paths, bad, seed=0)


def test_sample_subset_class_balanced(tree):
    paths = list_images(tree, "train")

    def per_class(sub: list[str]) -> dict[str, int]:
        return {c: sum(p.startswith(f"train/{c}/") for p in sub) for c in "abc"}
    assert per_class(sample_subset(paths, 0.1, seed=0, class_balanced=True)) == {"a": 1, "b": 1, "c": 1}
    assert per_class(sample_subset(paths, 0.5, seed=0, class_balanced=True)) == {"a": 5, "b": 4, "c": 2}
    assert per_class(sample_subset(paths, 0.25, seed=0, class_balanced=True)) == {"a": 3, "b": 2, "c": 1}


def test_spread_sample_covers_every_class_the_same_way_each_time(tree):
    paths = list_images(tree, "train")  # a: 10, b: 7, c: 3 images

    def per_class(sub: list[str]) -> dict[str, int]:
        return {c: sum(p.startswith(f"train/{c}/") for p in sub) for c in "abc"}
    five = spread_sample(paths, 5)
    assert five == sorted(five) == spread_sample(paths[::-1], 5) == spread_sample(paths, 5)
    assert per_class(five) == {"a": 2, "b": 2, "c": 1}  # round-robin, not the first classes
    assert per_class(paths[:5]) == {"a": 5, "b": 0, "c": 0}
    assert per_class(spread_sample(paths, 12)) == {"a": 5, "b": 4, "c": 3}  # c runs out
    assert set(spread_sample(paths, 4)) <= set(spread_sample(paths, 8))
    assert spread_sample(paths, None) == spread_sample(paths, 100) == paths


def test_pretrain_val_subset_spreads_over_classes(tiny):
    def val(n, seed=0):
        return prepare_pretrain_data(kind="imagenet", root=tiny / "imagenet", embedded_seed=0,
                                     fraction=0.5, class_balanced=False, on_error="skip",
                                     val_images=n, image_size=32, seed=seed).val.rel_paths
    every = list_images(tiny / "imagenet", "val")  # 2 per class
    assert val(None) == every
    chosen = val(K + 3)
    assert len(chosen) == K + 3 and chosen != every[:K + 3]
    assert chosen == val(K + 3, seed=5)  # the run's seed changes the train subset only
    assert {p.split("/")[1] for p in chosen} == {p.split("/")[1] for p in every}


def test_manifest_round_trip_and_hash(tree):
    sub = sample_subset(list_images(tree, "train"), 0.5, seed=0)
    path = tree / "manifests" / "seed0.txt"
    write_manifest(path, sub)
    assert read_manifest(path) == sub
    assert [p.name for p in path.parent.iterdir()] == ["seed0.txt"]  # no temp file left
    assert manifest_hash(read_manifest(path)) == manifest_hash(sub)
    assert manifest_hash(["x/a.jpg", "x/b.jpg"]) == hashlib.sha256(b"x/a.jpg\nx/b.jpg").hexdigest()
    assert manifest_hash(["x/b.jpg", "x/a.jpg"]) != manifest_hash(["x/a.jpg", "x/b.jpg"])
    with pytest.raises(ValueError):
        write_manifest(path, ["ok.jpg", "two\nlines.jpg"])


def test_ade_subset_pairs_with_annotations(tiny, tmp_path):
    stems = sample_subset(list_ade_stems(tiny / ADE, "training"), 0.4, seed=0)
    assert len(stems) == 2
    assert len(ADESegDataset(tiny / ADE, "training", stems)) == 2
    (tmp_path / "images/training").mkdir(parents=True)
    (tmp_path / "annotations/training").mkdir(parents=True)
    (tmp_path / "images/training/ADE_train_00000001.jpg").touch()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000001.png"):
        list_ade_stems(tmp_path, "training")


# ---------------------------------------------------------------- ImageFolderDataset

def test_train_augmentation_is_seeded(tiny):
    paths = list_images(tiny, "imagenet/train")
    a, b = (ImageFolderDataset(tiny, paths, 24, train=True) for _ in range(2))
    with pytest.raises(RuntimeError, match="set_epoch"):
        a[0]
    a.set_epoch(0, seed=7)
    b.set_epoch(0, seed=7)
    _ = b[3]  # reading order must not matter
    x, i = a[5]
    assert i == 5 and x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert torch.equal(x, b[5][0])
    epoch0 = [a[j][0] for j in range(len(a))]
    a.set_epoch(1, seed=7)
    assert sum(not torch.equal(u, a[j][0]) for j, u in enumerate(epoch0)) >= 0.9 * len(a)
    a.set_epoch(0, seed=8)
    assert sum(not torch.equal(u, a[j][0]) for j, u in enumerate(epoch0)) >= 0.9 * len(a)


def test_val_is_deterministic_and_normalised(tiny, tmp_path):
    rel = list_images(tiny, "imagenet/val")[:4]
    ds = ImageFolderDataset(tiny, rel, 16, train=False)
    x = ds[2][0]
    assert torch.equal(x, ImageFolderDataset(tiny, rel, 16, train=False)[2][0])
    with Image.open(tiny / rel[2]) as im:
        want = np.asarray(im.convert("RGB").resize((16, 16), Image.BICUBIC), np.float32) / 255
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose((x * std + mean).permute(1, 2, 0).numpy(), want, atol=1e-6)
    Image.new("RGB", (20, 20), (255, 255, 255)).save(tmp_path / "white.png")
    white = ImageFolderDataset(tmp_path, ["white.png"], 8, train=False)[0][0]
    np.testing.assert_allclose(white[:, 0, 0].numpy(), [2.2489, 2.4286, 2.6400], atol=1e-4)


def test_corrupt_image_raise_or_skip(tiny, tmp_path):
    rel = list_images(tiny, "imagenet/val")[:3]
    for r in rel:
        (tmp_path / r).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / r).write_bytes((tiny / r).read_bytes())
    (tmp_path / rel[1]).write_bytes(b"not a jpeg at all" * 10)
    missing = "imagenet/val/missing.JPEG"
    assert check_readable(tmp_path, rel + [missing]) == [rel[1], missing]
    with pytest.raises(DataError, match=re.escape(str(tmp_path / rel[1]))):
        ImageFolderDataset(tmp_path, rel, 16, train=False)[1]
    ds = ImageFolderDataset(tmp_path, rel, 16, train=False, on_error="skip")
    with pytest.warns(RuntimeWarning, match=re.escape(rel[1])):
        x, i = ds[1]
    assert i == 1 and torch.equal(x, ds[2][0]) and ds.skipped == 1  # next readable image
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file
        assert len([ds[j] for j in range(len(ds))]) == 3 and ds.skipped == 1


def test_skipped_images_counted_across_dataloader_workers(tiny, tmp_path):
    """Issue 11, fault 5: a bad file found in a DataLoader worker is counted in the main
    process (run.json's skipped_images read 0 with data.num_workers > 0)."""
    rel = list_images(tiny, "imagenet/val")[:6]
    for r in rel:
        (tmp_path / r).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / r).write_bytes((tiny / r).read_bytes())
    (tmp_path / rel[1]).write_bytes(b"not a jpeg at all" * 10)
    (tmp_path / rel[4]).write_bytes(b"")
    ds = ImageFolderDataset(tmp_path, rel, 16, train=False, on_error="skip")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    for _ in range(2):  # a second epoch (fresh workers) neither re-counts nor forgets them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert sum(len(idx) for _, idx in loader) == 6
        assert ds.skipped == 2


# ---------------------------------------------------------------- ADESegDataset

def test_ade_reduce_zero_label(tiny):
    raw = ADESegDataset(tiny / ADE, "training", reduce_zero_label=False)
    red = ADESegDataset(tiny / ADE, "training")
    assert red.num_classes == K and red.classes[0] == "astronaut"
    img, lab = red[0]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and lab.dtype == np.uint8
    r = raw[0][1]
    assert np.array_equal(lab == 255, r == 0) and np.array_equal(lab[r > 0], r[r > 0] - 1)
    assert set(np.unique(lab)) <= set(range(K)) | {255}


def test_ade_hand_made(tmp_path):
    (tmp_path / "images/validation").mkdir(parents=True)
    (tmp_path / "annotations/validation").mkdir(parents=True)
    Image.new("RGB", (5, 1)).save(tmp_path / "images/validation/x.jpg")
    label = np.array([[0, 1, 2, 3, 255]], np.uint8)
    Image.fromarray(label).save(tmp_path / "annotations/validation/x.png")
    (tmp_path / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.5\t1\t1\twall\n"
        "2\t0.3\t1\t1\tbuilding, edifice\n3\t0.2\t1\t1\tsky\n")
    ds = ADESegDataset(tmp_path, "validation")
    assert ds.num_classes == 3 and ds.classes[1] == "building, edifice"
    assert ds[0][1].tolist() == [[255, 0, 1, 2, 255]]  # 255 stays ignore, as in mmseg


def test_cached_images_are_decoded_once_with_the_same_pixels(tiny, monkeypatch):
    paths = list_images(tiny, "imagenet/train")
    plain, cached = (ImageFolderDataset(tiny, paths, 24, train=True, cache=c) for c in (False, True))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    for epoch in (0, 1):
        for ds in (plain, cached):
            ds.set_epoch(epoch, seed=3)
        for j in range(len(paths)):
            assert torch.equal(plain[j][0], cached[j][0])  # the same augmented pixels
    assert len(opened) == 2 * len(paths) + len(paths)  # plain: every epoch; cached: once
