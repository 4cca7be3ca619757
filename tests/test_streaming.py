"""Natural images at full size: a streamed image folder (lazy splits, DataLoader workers over the
files, torchvision's crop-and-flip recipe), the one place that picks loader and augmentation per
source, and specialists that read their own examples from the files under an embedded Ray."""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from specdistill.config import Config, DataConfig
from specdistill.data import Split, load_data, take
from specdistill.data import stream as stream_module
from specdistill.data.loading import BatchAugment, NaturalBatchAugment, training_batches
from specdistill.data.stream import FolderImages, StreamLoader
from specdistill.engine import predict_logits
from specdistill.errors import SpecdistillError

CLASSES = ("ant", "bee", "cat", "dog")
SIZE = 16


def write_tree(root: Path, per_class: int, seed: int) -> None:
    """Class folders of mixed sizes and kinds: RGB JPEG, RGB PNG, greyscale JPEG and PNG, and one
    16-bit PNG; each class its own colour, so a model can learn them."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(18, 48, 2))
            colour = np.array([60 + 60 * c, 220 - 50 * c, 40 + 30 * (c % 2)])
            rgb = np.clip(colour + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            kind = i % 4
            if kind == 0:
                Image.fromarray(rgb).save(root / name / f"{i}.jpg", quality=90)
            elif kind == 1:
                Image.fromarray(rgb).save(root / name / f"{i}.png")
            elif kind == 2:
                Image.fromarray(rgb).convert("L").save(root / name / f"{i}.jpeg")
            elif c == 0 and i == 3:
                deep = (rgb.mean(-1) * 257).astype(np.uint16)
                Image.fromarray(deep).save(root / name / f"{i}-16bit.png")
            else:
                Image.fromarray(rgb).convert("L").save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_tree(root / "train", per_class=10, seed=0)
    write_tree(root / "test", per_class=3, seed=1)
    return root


def data_config(root: Path, **extra) -> DataConfig:
    return DataConfig(source="imagefolder", root=str(root), image_size=SIZE, val_fraction=0.2,
                      cache_dir=str(root.parent / f"{root.name}-cache"), **extra)


@pytest.fixture(scope="module")
def streamed(folder):
    return load_data(data_config(folder, stream=True))


def test_streamed_reads_equal_the_in_memory_decode(folder, streamed) -> None:
    in_memory = load_data(data_config(folder, stream=False))
    assert in_memory.meta["stream"] is False and streamed.meta["stream"] is True
    assert "RandomResizedCrop" in streamed.meta["train_augment"]
    assert "NaturalBatchAugment" in in_memory.meta["train_augment"]
    assert (streamed.channels, streamed.image_size) == (3, SIZE) and streamed.class_names == list(CLASSES)
    for name in ("train", "val", "test"):
        lazy, decoded = streamed.split(name), in_memory.split(name)
        assert isinstance(lazy.images, FolderImages) and lazy.images.shape == decoded.images.shape
        np.testing.assert_array_equal(lazy.labels, decoded.labels)
        np.testing.assert_array_equal(lazy.images[:], decoded.images)
    rows = np.array([5, 0, 17])
    np.testing.assert_array_equal(streamed.train.images[rows], in_memory.train.images[rows])
    mask = streamed.val.labels == 2
    np.testing.assert_array_equal(streamed.val.images[mask], in_memory.val.images[mask])
    np.testing.assert_array_equal(streamed.train.images[-1], in_memory.train.images[-1])
    # a subset (data.limit, a specialist's held-out rows) stays lazy and reads the same images
    part = streamed.train.subset(rows)
    assert isinstance(part.images, FolderImages) and isinstance(take(streamed.val.images, mask), FolderImages)
    np.testing.assert_array_equal(part.images[:], in_memory.train.images[rows])
    # the 16-bit PNG is scaled by its depth, not clipped to white
    deep = next(i for i in range(len(streamed.train)) if streamed.train.images.path(i).endswith("-16bit.png"))
    assert streamed.train.images[deep].mean() < 200
    limited = load_data(data_config(folder, stream=True, limit=5))
    assert isinstance(limited.train.images, FolderImages) and len(limited.train) == 5


def test_auto_streams_a_folder_too_big_for_memory(folder, monkeypatch) -> None:
    from specdistill.data import folder as folder_source

    assert not isinstance(load_data(data_config(folder)).train.images, FolderImages)   # 52 files: in memory
    monkeypatch.setattr(folder_source, "STREAM_ABOVE_BYTES", 40 * SIZE * SIZE * 3)
    assert isinstance(load_data(data_config(folder)).train.images, FolderImages)
    two = load_data(data_config(folder, classes=["ant", "bee"]))                      # 26 files of them
    assert not isinstance(two.train.images, FolderImages) and two.class_names == ["ant", "bee"]


def test_a_streamed_split_is_never_decoded_whole(streamed, monkeypatch) -> None:
    images = streamed.train.images
    with pytest.raises(SpecdistillError, match="never decoded whole"):
        np.asarray(images)
    assert len(pickle.dumps(images)) < 4096                       # paths, not pixels
    largest = []
    submit = FolderImages._submit

    def counting(self, files):
        largest.append(len(files))
        return submit(self, files)

    monkeypatch.setattr(FolderImages, "_submit", counting)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 4))
    logits = predict_logits(model, images, batch_size=8)
    assert logits.shape == (len(images), 4) and max(largest) <= 8 and len(largest) >= len(images) // 8
    expected = predict_logits(model, images[:], batch_size=64)
    torch.testing.assert_close(logits, expected)


def _epoch(loader, epoch: int) -> dict[int, np.ndarray]:
    """One epoch's images by example index (checking dtype, shape and that labels follow the index)."""
    loader.sampler.set_epoch(epoch)
    labels = loader.dataset.labels.numpy()
    seen = {}
    for images, batch_labels, index in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (SIZE, SIZE, 3) and len(images) <= 8
        np.testing.assert_array_equal(batch_labels.numpy(), labels[index.numpy()])
        seen.update(zip(index.tolist(), images.numpy()))
    return seen


def test_train_loader_crops_and_flips_per_epoch_the_same_for_any_workers(folder, streamed) -> None:
    cfg = data_config(folder, stream=True, loader_workers=2)
    loader, augment = training_batches(streamed.train, cfg, batch_size=8, seed=3)
    assert augment is None and isinstance(loader, StreamLoader) and len(loader) == len(streamed.train) // 8
    first = _epoch(loader, 0)
    in_process, _ = training_batches(streamed.train, cfg.model_copy(update={"loader_workers": 0}), 8, seed=3)
    again = _epoch(in_process, 0)
    assert first.keys() == again.keys() and len(first) == 8 * len(loader)
    assert all(np.array_equal(first[i], again[i]) for i in first)    # same seed + epoch, any workers
    second = _epoch(loader, 1)
    both = sorted(first.keys() & second.keys())
    assert both and sum(not np.array_equal(first[i], second[i]) for i in both) >= len(both) - 1
    centre = streamed.train.images[np.array(both)]
    assert sum(not np.array_equal(second[i], c) for i, c in zip(both, centre)) >= len(both) - 1
    other_seed, _ = training_batches(streamed.train, cfg, batch_size=8, seed=4)
    other = _epoch(other_seed, 0)
    assert sum(not np.array_equal(other[i], first[i]) for i in first) >= len(first) - 1
    plain, _ = training_batches(streamed.train, cfg.model_copy(update={"augment": False}), 8, seed=3)
    unaugmented = _epoch(plain, 0)
    assert all(np.array_equal(unaugmented[i], streamed.train.images[i]) for i in unaugmented)


def test_an_interrupted_run_on_a_streamed_folder_resumes_to_identical_weights(folder, streamed, tmp_path) -> None:
    from specdistill.config import TrainConfig
    from specdistill.engine import fit

    cfg = data_config(folder, stream=True, loader_workers=1)
    train = TrainConfig(epochs=2, batch_size=8, lr=0.05)

    def run(out: Path, objective=None, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 4))
        loader, augment = training_batches(streamed.train, cfg, train.batch_size, seed=0)
        fit(model, loader, streamed.val, train, out, objective=objective, progress=False, device="cpu")
        return model

    reference = run(tmp_path / "ref")
    calls = {"n": 0}

    def dies_in_epoch_two(model, images, labels, index):
        calls["n"] += 1
        if calls["n"] > len(streamed.train) // 8 + 1:
            raise KeyboardInterrupt   # killed mid-epoch
        logits = model(images)
        return logits, {"ce": torch.nn.functional.cross_entropy(logits, labels)}

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", dies_in_epoch_two)
    resumed = run(tmp_path / "run", seed=123)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_the_crop_recipe_is_torchvisions(tmp_path) -> None:
    """With the whole image as the crop, RandomResizedCrop + flip is a resize, mirrored about half the
    time; the draws follow the seed."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((SIZE, SIZE), Image.BILINEAR))
    outs = [stream_module.random_resized_crop(image, SIZE, (1.0, 1.0), seed) for seed in range(40)]
    mirrored = [np.array_equal(o, resized[:, ::-1]) for o in outs]
    assert all(m or np.array_equal(o, resized) for o, m in zip(outs, mirrored)) and 8 < sum(mirrored) < 32
    np.testing.assert_array_equal(stream_module.random_resized_crop(image, SIZE, (0.08, 1.0), 7),
                                  stream_module.random_resized_crop(image, SIZE, (0.08, 1.0), 7))
    state = torch.get_rng_state()
    stream_module.random_resized_crop(image, SIZE, (0.08, 1.0), 1)
    assert torch.equal(state, torch.get_rng_state())              # the caller's RNG is left alone
    # the crop box follows torchvision's get_params: inside the image, area and ratio in range
    # (up to rounding), and the central fallback for a strip no crop of an allowed ratio fits
    draw = random.Random(0)
    for _ in range(200):
        top, left, h, w = stream_module.crop_box(400, 300, (0.08, 1.0), draw)
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w and 0.07 < h * w / 120_000 <= 1.0
        assert 0.7 < w / h < 1.4
    strip = Image.new("RGB", (400, 40))
    assert stream_module.crop_box(400, 40, (0.9, 1.0), draw) == RandomResizedCrop.get_params(strip, [0.9, 1.0],
                                                                                           [3 / 4, 4 / 3])


def test_a_corrupt_image_is_one_line_naming_it_also_in_a_worker(folder, tmp_path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(folder, root)
    bad = root / "train" / "bee" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    data = load_data(data_config(root, stream=True))                # scanning opens no image
    for workers in (2, 0):
        loader, _ = training_batches(data.train, data_config(root, stream=True, loader_workers=workers), 64)
        with pytest.raises(SpecdistillError, match="cannot read image .*bee/1.png.*replace or delete") as info:
            next(iter(loader))
        assert "\n" not in str(info.value)
    with pytest.raises(SpecdistillError, match="bee/1.png") as info:
        data.train.images[:]
    assert "\n" not in str(info.value)


def test_training_batches_picks_loader_and_augment_per_source(streamed, tiny_splits) -> None:
    train, _ = tiny_splits
    glyphs = DataConfig(source="synthetic")
    assert isinstance(training_batches(train, glyphs, 32)[1], BatchAugment)
    assert isinstance(training_batches(train, DataConfig(source="cifar100"), 32)[1], NaturalBatchAugment)
    assert training_batches(train, glyphs.model_copy(update={"augment": False}), 32)[1] is None
    loader, augment = training_batches(streamed.train, DataConfig(source="imagefolder"), 32)
    assert isinstance(loader, StreamLoader) and augment is None


def test_natural_batch_augment_crops_inside_the_image_and_flips() -> None:
    x = torch.rand(64, 3, SIZE, SIZE) * 2 - 1
    whole = NaturalBatchAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = whole(x, torch.Generator().manual_seed(0))
    same = (out - x).abs().amax((1, 2, 3)) < 1e-5
    mirrored = (out - x.flip(-1)).abs().amax((1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all()) and 16 < int(mirrored.sum()) < 48
    crop = NaturalBatchAugment()
    a, b = (crop(x, torch.Generator().manual_seed(1)) for _ in range(2))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, crop(x, torch.Generator().manual_seed(2)))
    assert a.min() >= x.min() - 1e-5 and a.max() <= x.max() + 1e-5  # bilinear inside the image


# ----------------------------------------------------------------------------------------------
# Specialists on a streamed folder: each reads its own files; the object store carries paths


def _config(folder: Path, run_dir: Path, workers: int) -> Config:
    return Config.model_validate({
        "name": "stream-test", "run_dir": str(run_dir), "device": "cpu",
        "data": {"source": "imagefolder", "root": str(folder), "image_size": SIZE, "val_fraction": 0.2,
                 "stream": True, "loader_workers": workers},
        "generalist": {"model": {"name": "mlp", "hidden": [16]},
                       "train": {"epochs": 1, "batch_size": 8, "lr": 0.05}},
        "specialists": {"train": {"epochs": 1, "batch_size": 8, "lr": 0.05}, "num_cpus_per_task": 1},
    })


def _generalist_and_groups(cfg: Config) -> None:
    from generalist.train import run_generalist
    from specdistill.records import Clusters, Group
    from specdistill.rundir import RunDir

    meta = run_generalist(cfg, progress=False)
    assert meta["data"]["stream"] is True
    groups = [Group(0, [0, 1], ["ant", "bee"]), Group(1, [2, 3], ["cat", "dog"])]
    Clusters(4, list(CLASSES), groups).write(RunDir.of(cfg).clusters)


def test_a_specialist_reads_only_the_files_it_samples(folder, tmp_path, monkeypatch) -> None:
    from specdistill.rundir import RunDir
    from specialists.fanout import load_inputs
    from specialists.train import train_one

    cfg = _config(folder, tmp_path / "run", workers=0)
    cfg.specialists.specialist_fraction = 0.8       # batches of 6 group + 2 other examples
    _generalist_and_groups(cfg)
    inputs = load_inputs(cfg, RunDir.of(cfg))
    data = inputs["data"]
    assert isinstance(data["train_images"], FolderImages) and len(pickle.dumps(data)) < 16_384
    opened = []
    open_rgb = stream_module.open_rgb
    monkeypatch.setattr(stream_module, "open_rgb", lambda path: opened.append(path) or open_rgb(path))
    monkeypatch.setattr("specdistill.data.folder.open_rgb", lambda path: opened.append(path) or open_rgb(path))
    result = train_one(inputs["generalist"], inputs["groups"][0], data, cfg)
    train = Split(data["train_images"], data["train_labels"])
    read = set(opened)
    paths = [train.images.path(i) for i in range(len(train))]
    group = {p for p, y in zip(paths, train.labels) if y in (0, 1)}
    others = set(paths) - group
    assert group <= read                                   # every group example, and a sample of the rest
    assert 0 < len(others & read) < len(others)
    assert result["model_meta"]["num_classes"] == 3 and np.isfinite(result["metrics"]["specialist_group_acc"])


def test_specialists_stage_on_a_streamed_folder_with_embedded_ray(folder, tmp_path) -> None:
    import ray

    from specialists import load_specialists
    from specialists.fanout import run_specialists

    cfg = _config(folder, tmp_path / "run", workers=1)
    _generalist_and_groups(cfg)
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        summary = run_specialists(cfg, progress=False)
        # the driver's own node late for the software check is a busy machine, not an unreachable
        # node: it gets more time instead of failing the stage (other nodes: test_cluster.py)
        from specialists.ray_cluster import check_nodes
        assert check_nodes({"CPU": 1}, timeout_s=0) == 1
    finally:
        ray.shutdown()
    assert summary["trained"] == 2 and summary["total"] == 2
    loaded = load_specialists(cfg.run_path)
    assert [info.id for _, info in loaded] == [0, 1] and all(m.num_classes == 3 for m, _ in loaded)
