"""fashion-mnist from the Debian package ``dataset-fashion-mnist`` (IDX files, read with numpy).

The package installs ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` in
/usr/share/datasets/fashion-mnist; ``data.root`` may point elsewhere (plain or gzipped files).
The held-out split is a stratified ``data.val_fraction`` of the training set; test is t10k.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from specdistill.config import DataConfig
from specdistill.data import DATA_SOURCES, Dataset, Split
from specdistill.data.cache import load_or_build
from specdistill.data.folder import resize_images, stratified_holdout
from specdistill.errors import SpecdistillError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic, big-endian dimensions, raw data), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise SpecdistillError(f"cannot read {path} ({exc}); reinstall it: apt-get install --reinstall "
                               "dataset-fashion-mnist") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise SpecdistillError(f"{path} is not an IDX file; reinstall it: apt-get install --reinstall "
                               "dataset-fashion-mnist")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise SpecdistillError(f"{path} is truncated ({len(body)} of {expected} bytes); reinstall it: "
                               "apt-get install --reinstall dataset-fashion-mnist")
    return np.frombuffer(body, dtype).reshape(dims)


def _locate(root: Path) -> dict[str, Path]:
    found, missing = {}, []
    for stem in (stem for pair in FILES.values() for stem in pair):
        for candidate in (root / f"{stem}.gz", root / stem):
            if candidate.is_file():
                found[stem] = candidate
                break
        else:
            missing.append(stem)
    if missing:
        hint = ("install them with: apt-get install dataset-fashion-mnist" if root == DEFAULT_ROOT else
                "set data.root to the folder holding them, or apt-get install dataset-fashion-mnist and "
                "leave data.root unset")
        raise SpecdistillError(f"fashion-mnist files not found in {root} (missing {', '.join(missing)}); {hint}")
    return found


def build_fashion_mnist(cfg: DataConfig, files: dict[str, Path]) -> Dataset:
    arrays = {}
    for split, (images_stem, labels_stem) in FILES.items():
        images, labels = read_idx(files[images_stem]), read_idx(files[labels_stem]).astype(np.int64)
        if images.ndim != 3 or len(images) != len(labels) or images.dtype != np.uint8:
            raise SpecdistillError(f"{files[images_stem]} and {files[labels_stem]} do not match "
                                   f"({images.shape} images, {labels.shape} labels); reinstall dataset-fashion-mnist")
        arrays[split] = (resize_images(images, cfg.image_size), labels)
    images, labels = arrays["train"]
    kept, held = stratified_holdout(labels, cfg.val_fraction, [cfg.data_seed, 2])
    return Dataset("fashion-mnist", list(CLASS_NAMES), Split(images[kept], labels[kept]),
                   Split(images[held], labels[held]), Split(*arrays["test"]),
                   {"root": str(files[FILES["train"][0]].parent)})


@DATA_SOURCES.register("fashion-mnist")
def load_fashion_mnist(cfg: DataConfig, seed: int = 0) -> Dataset:
    root = Path(cfg.root).expanduser() if cfg.root else DEFAULT_ROOT
    files = _locate(root)
    options = {"source": "fashion-mnist", "image_size": cfg.image_size, "val_fraction": cfg.val_fraction,
               "data_seed": cfg.data_seed,
               "files": {stem: [str(p), p.stat().st_size, int(p.stat().st_mtime)] for stem, p in files.items()}}
    return load_or_build(cfg, "fashion-mnist", options, lambda: build_fashion_mnist(cfg, files))
