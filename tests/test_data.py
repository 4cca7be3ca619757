"""Every data source at tiny sizes: shapes, labels, disjoint fonts, merged look-alikes, ink, cache,
and the one-line errors for bad input."""

from __future__ import annotations

import gzip
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specdistill.config import DataConfig
from specdistill.data import Dataset, glyphs, hanzi, load_data
from specdistill.data import folder as folder_source
from specdistill.data.fashion_mnist import read_idx
from specdistill.data.folder import resize_images, stratified_holdout
from specdistill.data.jitter import Jitter, jitter_copies
from specdistill.data.preview import save_sample_grid
from specdistill.data.render import has_ink
from specdistill.data.synthetic import planted_groups
from specdistill.errors import SpecdistillError


def check_dataset(ds: Dataset, image_shape: tuple[int, ...]) -> None:
    """Shapes, dtypes, label ranges and ink in every image of every split."""
    for name in ("train", "val", "test"):
        split = ds.split(name)
        assert len(split) > 0, name
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int64
        assert split.images.shape[1:] == image_shape
        assert split.labels.min() >= 0 and split.labels.max() < ds.num_classes
        assert has_ink(split.images if split.images.ndim == 3 else split.images.max(-1)).all(), name
    assert len(set(ds.class_names)) == ds.num_classes


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def latin(cache: str) -> Dataset:
    return load_data(DataConfig(source="glyphs-latin", image_size=16, copies_per_font=1, cache_dir=cache))


@pytest.fixture(scope="module")
def chinese(cache: str) -> Dataset:
    return load_data(DataConfig(source="glyphs-hanzi", num_classes=20, image_size=24, copies_per_font=1,
                                cache_dir=cache))


# ----------------------------------------------------------------------------------------------
# glyphs-latin


def test_latin_shapes_and_every_class_in_every_split(latin: Dataset) -> None:
    check_dataset(latin, (16, 16))
    assert 350 <= latin.num_classes <= 450
    for name in ("train", "val", "test"):
        assert set(np.unique(latin.split(name).labels)) == set(range(latin.num_classes)), name


def test_latin_fonts_disjoint_with_variety(latin: Dataset) -> None:
    faces = {name: set(names) for name, names in latin.meta["faces"].items()}
    assert not faces["train"] & faces["val"] and not faces["train"] & faces["test"]
    assert not faces["val"] & faces["test"]
    for names in faces.values():
        assert any("Mono" in n for n in names) and any("Serif" in n or "STIX" in n for n in names)
        assert any("Sans" in n and "Mono" not in n for n in names)


def test_latin_merges_identical_glyphs_and_keeps_lookalikes(latin: Dataset) -> None:
    names = latin.class_names
    assert "A" in names and "\u0391" not in names and "\u0410" not in names   # Greek Alpha, Cyrillic A
    assert set(latin.meta["merged"]["A"]) >= {"A", "\u0391", "\u0410"}
    for lookalike in ["O", "0", "l", "1", "I", "e", "é", "è", "ê", "ë", "ē"]:
        assert lookalike in names, lookalike
    assert set("eéèêëē") <= set(latin.meta["families"]["e"])


def test_merge_lookalikes_groups_only_same_renderings() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 8, 8)).astype(np.float32)
    reference = np.stack([np.stack([a, a, b]), np.stack([a, a, b])])   # 2 faces, 3 characters
    groups = glyphs.merge_lookalikes(["x", "\u0445", "y"], reference)    # Latin x, Cyrillic ha
    assert sorted(groups) == [["x", "\u0445"], ["y"]]


def test_latin_glyphs_are_centred(latin: Dataset) -> None:
    images = latin.test.images.astype(np.float64)
    coords = np.arange(16)
    mass = images.sum(axis=(1, 2))
    cx = (images.sum(axis=1) * coords).sum(1) / mass
    cy = (images.sum(axis=2) * coords).sum(1) / mass
    assert abs(np.median(cx) - 7.5) < 1.0 and abs(np.median(cy) - 7.5) < 2.0
    assert np.all((cx > 3) & (cx < 12) & (cy > 2) & (cy < 13))


def test_cache_hit_returns_identical_arrays(latin: Dataset, cache: str, monkeypatch) -> None:
    def no_rendering(cfg):
        raise AssertionError("a cache hit must not render again")

    monkeypatch.setattr(glyphs, "build_glyphs_latin", no_rendering)
    again = load_data(DataConfig(source="glyphs-latin", image_size=16, copies_per_font=1, cache_dir=cache))
    assert again.class_names == latin.class_names
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(again.split(name).images, latin.split(name).images)
        np.testing.assert_array_equal(again.split(name).labels, latin.split(name).labels)


def test_jitter_is_seeded_and_keeps_ink() -> None:
    base = np.zeros((3, 32, 32), np.float32)
    base[:, 8:24, 14:18] = 1.0
    one = jitter_copies(base, 4, 16, Jitter(), np.random.default_rng(1))
    assert one.shape == (12, 16, 16) and one.dtype == np.uint8 and has_ink(one).all()
    np.testing.assert_array_equal(one, jitter_copies(base, 4, 16, Jitter(), np.random.default_rng(1)))
    assert not np.array_equal(one, jitter_copies(base, 4, 16, Jitter(), np.random.default_rng(2)))


# ----------------------------------------------------------------------------------------------
# glyphs-hanzi


def test_hanzi_classes_faces_and_ink(chinese: Dataset) -> None:
    check_dataset(chinese, (24, 24))
    assert chinese.num_classes == 20
    level1 = hanzi.gb2312_level1()
    assert len(level1) == 3755 and level1[0] == "啊"
    assert chinese.class_names == [c for c in level1 if c not in chinese.meta["skipped_chars"]][:20]
    faces = {name: set(names) for name, names in chinese.meta["faces"].items()}
    assert all(faces.values())
    assert not faces["train"] & faces["val"] and not faces["train"] & faces["test"]
    assert not faces["val"] & faces["test"]
    families = {name: {hanzi.family_of(f) for f in fs} for name, fs in faces.items()}
    assert not families["train"] & families["test"]   # test fonts are designs never trained on
    # a face merged as a duplicate is in no split
    assert not set(chinese.meta["duplicate_faces"]) & set().union(*faces.values())


def test_hanzi_without_fonts_names_the_packages(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hanzi, "FONT_DIRS", (str(tmp_path),))
    with pytest.raises(SpecdistillError, match="apt-get install fonts-noto-cjk"):
        load_data(DataConfig(source="glyphs-hanzi", num_classes=20, cache_dir=str(tmp_path)))


def test_hanzi_rejects_more_classes_than_gb2312_level1(tmp_path: Path) -> None:
    with pytest.raises(SpecdistillError, match="at most 3755"):
        load_data(DataConfig(source="glyphs-hanzi", num_classes=4000, cache_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())   # nothing half-made left in the cache


def test_hanzi_skips_faces_freetype_cannot_read(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "broken.ttf").write_bytes(b"\0\1\0\0" + bytes(2 << 20))
    monkeypatch.setattr(hanzi, "FONT_DIRS", (str(tmp_path),))
    with pytest.warns(UserWarning, match="broken.ttf"):
        assert hanzi.discover_faces(hanzi.gb2312_level1()[:50]) == []


# ----------------------------------------------------------------------------------------------
# fashion-mnist


def test_fashion_mnist(tmp_path: Path) -> None:
    ds = load_data(DataConfig(source="fashion-mnist", image_size=28, limit=500, cache_dir=str(tmp_path)))
    check_dataset(ds, (28, 28))
    assert ds.class_names[0] == "T-shirt/top" and ds.num_classes == 10
    assert len(ds.train) == len(ds.val) == len(ds.test) == 500
    assert set(np.unique(ds.val.labels)) == set(range(10))


def test_fashion_mnist_missing_and_truncated(tmp_path: Path) -> None:
    with pytest.raises(SpecdistillError, match="dataset-fashion-mnist"):
        load_data(DataConfig(source="fashion-mnist", root=str(tmp_path / "nowhere"), cache_dir=str(tmp_path)))
    bad = tmp_path / "t.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(bytes([0, 0, 8, 3]) + np.array([10, 28, 28], ">u4").tobytes() + bytes(100))
    with pytest.raises(SpecdistillError, match="truncated"):
        read_idx(bad)


# ----------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_planted_groups_are_confusable(tmp_path: Path) -> None:
    cfg = DataConfig(source="synthetic", num_classes=30, group_size=5, examples_per_class=40, image_size=16)
    ds = load_data(cfg)
    check_dataset(ds, (16, 16))
    groups = planted_groups(30, 5)
    assert sorted(np.concatenate(groups).tolist()) == list(range(30)) and {len(g) for g in groups} == {5}
    assert [g.tolist() for g in groups] == ds.meta["groups"]
    np.testing.assert_array_equal(load_data(cfg).train.images, ds.train.images)   # deterministic
    # nearest class mean: better than chance, and its mistakes stay inside the planted group
    x_train = ds.train.images.reshape(len(ds.train), -1).astype(np.float32)
    means = np.stack([x_train[ds.train.labels == c].mean(0) for c in range(30)])
    x_val = ds.val.images.reshape(len(ds.val), -1).astype(np.float32)
    predicted = ((x_val[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    group_of = np.empty(30, int)
    for g, members in enumerate(groups):
        group_of[members] = g
    wrong = predicted != ds.val.labels
    assert 0.02 < wrong.mean() < 0.6         # confusable, yet learnable
    assert np.mean(group_of[predicted[wrong]] == group_of[ds.val.labels[wrong]]) > 0.9


# ----------------------------------------------------------------------------------------------
# imagefolder and cifar100


def write_images(root: Path, classes: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(40, 255, (20, 26, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_imagefolder_layouts_and_subset(tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "train", {"cat": 6, "dog": 6, "emu": 6})
    write_images(tmp_path / "data" / "test", {"cat": 2, "dog": 2, "emu": 2}, seed=1)
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "data"), image_size=16, val_fraction=0.34,
                     cache_dir=str(tmp_path / "cache"))
    ds = load_data(cfg)
    check_dataset(ds, (16, 16, 3))
    assert ds.class_names == ["cat", "dog", "emu"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 6, 6)
    sub = load_data(cfg.model_copy(update={"classes": ["emu", "cat"]}))
    assert sub.class_names == ["cat", "emu"] and len(sub.test) == 4
    write_images(tmp_path / "flat", {"a": 10, "b": 10})
    flat = load_data(cfg.model_copy(update={"root": str(tmp_path / "flat"), "val_fraction": 0.2}))
    assert (len(flat.train), len(flat.val), len(flat.test)) == (12, 4, 4)
    assert "carved" in flat.meta["layout"]


@pytest.mark.parametrize("problem", ["missing root", "empty class", "corrupt image", "unknown class"])
def test_imagefolder_bad_input(tmp_path: Path, problem: str) -> None:
    root = tmp_path / "data"
    write_images(root, {"cat": 3, "dog": 3})
    cfg = DataConfig(source="imagefolder", root=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    if problem == "missing root":
        cfg.root, expected = str(tmp_path / "nope"), "does not exist"
    elif problem == "empty class":
        (root / "owl").mkdir()
        expected = "class folder .*owl has no images"
    elif problem == "corrupt image":
        (root / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        expected = "cannot read image .*1.png"
    else:
        cfg.classes, expected = ["cat", "yak"], "yak"
    with pytest.raises(SpecdistillError, match=expected) as info:
        load_data(cfg)
    assert "\n" not in str(info.value)


def test_cifar100_offline_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(folder_source, "_torchvision_cifar100", lambda: offline)
    with pytest.raises(SpecdistillError, match="could not be downloaded"):
        load_data(DataConfig(source="cifar100", root=str(tmp_path), cache_dir=str(tmp_path)))


def test_split_and_resize_helpers() -> None:
    labels = np.repeat(np.arange(4), 10)
    kept, held = stratified_holdout(labels, 0.2, 0)
    assert not set(kept) & set(held) and len(kept) + len(held) == 40
    assert np.all(np.bincount(labels[held]) == 2)
    np.testing.assert_array_equal(held, stratified_holdout(labels, 0.2, 0)[1])
    grey = np.full((2, 28, 28), 200, np.uint8)
    assert resize_images(grey, 32).shape == (2, 32, 32) and np.all(resize_images(grey, 32) == 200)
    assert resize_images(np.zeros((1, 10, 12, 3), np.uint8), 8).shape == (1, 8, 8, 3)


# ----------------------------------------------------------------------------------------------
# preview


def test_sample_grids(latin: Dataset, chinese: Dataset, tmp_path: Path) -> None:
    for ds in (latin, chinese):
        path = save_sample_grid(ds, tmp_path / f"{ds.name}.png", classes=6)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            assert image.size[0] > 300
