"""imagefolder and cifar100: natural colour images through torchvision, as uint8 [N, H, W, 3].

``imagefolder`` reads ``data.root`` with torchvision's ImageFolder. Layouts:

- ``root/train/<class>/*`` plus optional ``root/val/<class>/*`` and ``root/test/<class>/*``:
  the folders that exist are used as they are. Without ``test/`` but with ``val/`` (ImageNet's
  layout) ``val/`` becomes the test split, because it is the one users report on; the held-out
  split is then carved from ``train/``. Without ``val/`` and ``test/`` both are carved from ``train/``.
- ``root/<class>/*`` (no ``train/``): held-out and test splits are both carved from it.
Carving is stratified, ``data.val_fraction`` of each class, seeded by ``data.data_seed``.
``data.classes`` keeps a subset of the class folders (e.g. 100 ImageNet classes).

Two ways to hold the images (``data.stream``; ``auto`` picks by the size the decoded arrays would
have, :data:`STREAM_ABOVE_BYTES`):

- in memory: every image resized (shorter side) and centre-cropped to ``data.image_size``, decoded
  once and cached; training augments these arrays on the device (``loading.NaturalBatchAugment``);
- streamed (ImageNet at full size): each split is a lazy :class:`~specdistill.data.stream.FolderImages`
  over the files, read per batch: resize + centre crop for evaluation, torchvision's
  RandomResizedCrop + horizontal flip in DataLoader workers for training. Nothing is cached.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from specdistill.config import DataConfig
from specdistill.data import DATA_SOURCES, Dataset, Split
from specdistill.data.cache import cache_root, load_or_build
from specdistill.errors import SpecdistillError


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): ``fraction`` of every class held out (at least one example of any
    class with two or more, never a class's last example), chosen at random with ``seed``."""
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if members.size >= 2:
            held.append(members[:min(members.size - 1, max(1, round(fraction * members.size)))])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_idx)
    return kept, held_idx


def resize_images(images: np.ndarray, size: int, batch: int = 2048) -> np.ndarray:
    """Anti-aliased bilinear resize of uint8 [N, H, W] or [N, H, W, C] to ``size`` x ``size``."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    colour = images.ndim == 4
    out = np.empty((len(images), size, size) + images.shape[3:], np.uint8)
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start:start + batch]).float()
        x = x.permute(0, 3, 1, 2) if colour else x[:, None]
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        y = y.permute(0, 2, 3, 1) if colour else y[:, 0]
        out[start:start + batch] = y.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


# ----------------------------------------------------------------------------------------------
# imagefolder


def _class_list(directory: Path, subset: list[str] | None) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        classes, _ = find_classes(str(directory))
    except FileNotFoundError:
        raise SpecdistillError(f"{directory} has no class folders; put images in {directory}/<class>/") from None
    if subset is None:
        return classes
    unknown = [name for name in subset if name not in classes]
    if unknown:
        shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
        raise SpecdistillError(f"data.classes names {', '.join(unknown)}, not a class folder of {directory} "
                               f"(it has {len(classes)}: {shown}); fix data.classes")
    wanted = set(subset)
    return [name for name in classes if name in wanted]


def _scan(directory: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Image paths and labels under ``directory/<class>`` (classes missing there are skipped)."""
    from torchvision.datasets import ImageFolder

    class Subset(ImageFolder):
        def find_classes(self, _directory: str) -> tuple[list[str], dict[str, int]]:
            return classes, {name: i for i, name in enumerate(classes)}

    folder = Subset(str(directory), allow_empty=True)
    counts = np.bincount([label for _, label in folder.samples], minlength=len(classes))
    for name, count in zip(classes, counts):
        if count == 0 and (directory / name).is_dir():
            raise SpecdistillError(f"class folder {directory / name} has no images (looked for "
                                   f"{', '.join(folder.extensions or ())}); add images or remove the folder")
    return [path for path, _ in folder.samples], np.array([label for _, label in folder.samples], np.int64)


# in the imagefolder cache key: 2 = high-bit-depth images scaled by their depth (1 clipped them);
# a source's own version, so other sources' caches stay valid
DECODER_VERSION = 2


def to_rgb(image):
    """Any PIL image as 8-bit RGB, scaled by its bit depth.

    ``convert("RGB")`` clips 16- and 32-bit values to 0..255, so a 16-bit photo or scan turns almost
    white; here a sample's full scale maps to 255: 65535 for 16-bit images (and the 32-bit ``I`` mode
    that PNG and PNM decode into), the BitsPerSample range a TIFF declares, and 1.0 for floats.
    """
    from PIL import Image

    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    scaled = np.clip(np.round(values * (255.0 / _full_scale(image))), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, "L").convert("RGB")


def _full_scale(image) -> float:
    """The value of a fully bright sample of a one-channel high-bit-depth image."""
    if image.mode == "F":
        return 1.0
    tags = getattr(image, "tag_v2", None)   # TIFF: BitsPerSample (258), SampleFormat (339; 2 = signed)
    if image.mode == "I" and tags is not None:
        bits, sample_format = (v[0] if isinstance(v, tuple) else v for v in (tags.get(258), tags.get(339)))
        if bits:
            return float(2 ** (int(bits) - 1) - 1 if sample_format == 2 else 2 ** int(bits) - 1)
    return 65535.0


def open_rgb(path: str):
    """The image at ``path`` as a loaded 8-bit RGB PIL image; a file PIL cannot read is one line
    naming it and the fix (the in-memory decode, the streamed reads and DataLoader workers alike)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode == "RGB":   # already 8-bit RGB: decode in place, no converted copy
                image.load()
                return image
            return to_rgb(image)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
        raise SpecdistillError(f"cannot read image {path} ({type(exc).__name__}: {exc}); "
                               "replace or delete the file") from None


def decode_centre(path: str, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the shorter side resized to ``size`` (antialiased bilinear), then the
    centre crop; the evaluation read of every natural-image path, in memory or streamed."""
    from torchvision.transforms import functional as TF

    return np.asarray(TF.center_crop(TF.resize(open_rgb(path), size), size), dtype=np.uint8)


def _decode(paths: list[str], size: int, desc: str) -> np.ndarray:
    """Decode, resize and centre-crop every image to uint8 [N, size, size, 3], naming any bad file."""
    from tqdm import tqdm

    out = np.empty((len(paths), size, size, 3), np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, image in enumerate(tqdm(pool.map(lambda path: decode_centre(path, size), paths), total=len(paths),
                                       desc=desc, leave=False)):
            out[i] = image
    return out


def _fingerprint(root: Path) -> list[int]:
    """Number, total size and newest mtime of the files under ``root``: a changed folder, a new cache."""
    count = size = newest = 0
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                stat = os.stat(path)
            except OSError as exc:
                what = f"a broken link (to {os.readlink(path)})" if os.path.islink(path) else "unreadable"
                raise SpecdistillError(f"image file {path} is {what}: {exc.strerror}; restore or delete it") from None
            count, size, newest = count + 1, size + stat.st_size, max(newest, int(stat.st_mtime))
    return [count, size, newest]


def _carve(split: tuple[list[str], np.ndarray], fraction: float, seed: list[int]) -> tuple[tuple, tuple]:
    paths, labels = split
    kept, held = stratified_holdout(labels, fraction, seed)
    return ([paths[i] for i in kept], labels[kept]), ([paths[i] for i in held], labels[held])


def folder_splits(cfg: DataConfig, root: Path) -> tuple[list[str], str, dict[str, tuple[list[str], np.ndarray]]]:
    """Class names, the layout found, and each split's (image paths, labels); nothing is decoded."""
    layout_dirs = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    train_dir = layout_dirs.get("train", root)
    classes = _class_list(train_dir, cfg.classes)
    if len(classes) < 2:   # before anything is decoded or trained
        subset = " (after data.classes)" if cfg.classes is not None else ""
        raise SpecdistillError(f"{train_dir} has {len(classes)} class folder{'s' * (len(classes) != 1)}{subset}: "
                               f"{', '.join(classes) or 'none'}; a classifier needs at least two, one folder of "
                               "images per class")
    train = _scan(train_dir, classes)
    if "train" not in layout_dirs:
        layout = "single folder: val and test carved from it"
        train, test = _carve(train, cfg.val_fraction, [cfg.data_seed, 1])
        train, val = _carve(train, cfg.val_fraction, [cfg.data_seed, 2])
    elif "test" in layout_dirs:
        test = _scan(layout_dirs["test"], classes)
        if "val" in layout_dirs:
            layout = "train/ val/ test/"
            val = _scan(layout_dirs["val"], classes)
        else:
            layout = "train/ test/: val carved from train/"
            train, val = _carve(train, cfg.val_fraction, [cfg.data_seed, 2])
    elif "val" in layout_dirs:
        layout = "train/ val/ (ImageNet): val/ is the test split, val carved from train/"
        test = _scan(layout_dirs["val"], classes)
        train, val = _carve(train, cfg.val_fraction, [cfg.data_seed, 2])
    else:
        layout = "train/ only: val and test carved from it"
        train, test = _carve(train, cfg.val_fraction, [cfg.data_seed, 1])
        train, val = _carve(train, cfg.val_fraction, [cfg.data_seed, 2])
    for name, (paths, _) in (("train", train), ("val", val), ("test", test)):
        if not paths:
            raise SpecdistillError(f"the {name} split of {root} is empty; add images (layout: {layout})")
    return classes, layout, {"train": train, "val": val, "test": test}


def build_imagefolder(cfg: DataConfig, root: Path) -> Dataset:
    """Every image decoded once (centre crop) into one in-memory array per split, for the cache."""
    classes, layout, parts = folder_splits(cfg, root)
    splits = {name: Split(_decode(paths, cfg.image_size, f"imagefolder {name}"), labels)
              for name, (paths, labels) in parts.items()}
    meta = {"root": str(root), "layout": layout}
    return Dataset("imagefolder", classes, splits["train"], splits["val"], splits["test"], meta)


def stream_imagefolder(cfg: DataConfig, root: Path) -> Dataset:
    """Each split a lazy :class:`~specdistill.data.stream.FolderImages` over its files: nothing is
    decoded here and nothing cached; batches are read from the files as they are needed."""
    from specdistill.data.stream import FolderImages, describe_stream

    classes, layout, parts = folder_splits(cfg, root)
    splits = {name: Split(FolderImages.of(root, paths, cfg.image_size), labels)
              for name, (paths, labels) in parts.items()}
    meta = {"root": str(root), "layout": layout, **describe_stream(cfg, True)}
    return Dataset("imagefolder", classes, splits["train"], splits["val"], splits["test"], meta)


# ``data.stream: auto`` streams a folder whose decoded arrays would take more than this much memory
STREAM_ABOVE_BYTES = 2 << 30


def streams(cfg: DataConfig, root: Path) -> bool:
    """Whether ``imagefolder`` streams: ``data.stream``, or for ``auto`` the size the decoded arrays
    would have (every file of the chosen class folders counted as an image of ``image_size``)."""
    if cfg.stream != "auto":
        return bool(cfg.stream)
    if cfg.classes is None:
        folders = [root]
    else:
        bases = [root / name for name in ("train", "val", "test") if (root / name).is_dir()] or [root]
        folders = [base / name for base in bases for name in cfg.classes]
    files = sum(len(names) for folder in folders for _, _, names in os.walk(folder))
    return files * cfg.image_size ** 2 * 3 > STREAM_ABOVE_BYTES


@DATA_SOURCES.register("imagefolder")
def load_imagefolder(cfg: DataConfig, seed: int = 0) -> Dataset:
    if not cfg.root:
        raise SpecdistillError("data.root is not set; point it at a folder of class folders "
                               "(root/<class>/*.jpg or root/train/<class>/*.jpg)")
    root = Path(cfg.root).expanduser().resolve()
    if not root.is_dir():
        raise SpecdistillError(f"image folder {root} does not exist; set data.root to a folder of class "
                               "folders (root/<class>/*.jpg or root/train/<class>/*.jpg)")
    if streams(cfg, root):
        return stream_imagefolder(cfg, root)
    options = {"source": "imagefolder", "root": str(root), "classes": cfg.classes, "image_size": cfg.image_size,
               "val_fraction": cfg.val_fraction, "data_seed": cfg.data_seed, "files": _fingerprint(root),
               "decoder": DECODER_VERSION}
    dataset = load_or_build(cfg, "imagefolder", options, lambda: build_imagefolder(cfg, root))
    dataset.meta.update(describe_in_memory(cfg))
    return dataset


def describe_in_memory(cfg: DataConfig) -> dict[str, Any]:
    """What a natural source held in memory did, for the dataset meta (and so the generalist's)."""
    from specdistill.data.loading import describe_augment

    return {"stream": False, "decode": f"once: shorter side to {cfg.image_size}, centre crop, cached",
            "train_augment": describe_augment(cfg, streamed=False)}


# ----------------------------------------------------------------------------------------------
# cifar100


def _torchvision_cifar100() -> Callable:
    from torchvision import datasets

    return datasets.CIFAR100


def build_cifar100(cfg: DataConfig, root: Path) -> Dataset:
    """Reads torchvision's copy once (its files are Python pickles; the cache holds plain arrays)."""
    cifar = _torchvision_cifar100()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)   # an offline machine fails in seconds instead of hanging
    try:
        train_set = cifar(str(root), train=True, download=True)
        test_set = cifar(str(root), train=False, download=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise SpecdistillError(
            f"CIFAR-100 is not in {root} and could not be downloaded ({type(exc).__name__}: {exc}); "
            f"run once on a machine with internet access, or copy cifar-100-python.tar.gz into {root}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    images = np.asarray(train_set.data, dtype=np.uint8)
    labels = np.asarray(train_set.targets, dtype=np.int64)
    kept, held = stratified_holdout(labels, cfg.val_fraction, [cfg.data_seed, 2])
    size = cfg.image_size
    return Dataset("cifar100", list(train_set.classes),
                   Split(resize_images(images[kept], size), labels[kept]),
                   Split(resize_images(images[held], size), labels[held]),
                   Split(resize_images(np.asarray(test_set.data, dtype=np.uint8), size), test_set.targets),
                   {"root": str(root)})


@DATA_SOURCES.register("cifar100")
def load_cifar100(cfg: DataConfig, seed: int = 0) -> Dataset:
    root = Path(cfg.root).expanduser() if cfg.root else cache_root(cfg) / "cifar100"
    options = {"source": "cifar100", "image_size": cfg.image_size, "val_fraction": cfg.val_fraction,
               "data_seed": cfg.data_seed}
    dataset = load_or_build(cfg, "cifar100", options, lambda: build_cifar100(cfg, root))
    dataset.meta.update(describe_in_memory(cfg))
    return dataset
