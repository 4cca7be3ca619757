"""Data sources behind one registry; each gives train / held-out (val) / test splits with class names.

A source is a function ``(cfg: DataConfig, seed: int) -> Dataset`` registered with
``@DATA_SOURCES.register("name")``. Images are uint8 arrays ([N, H, W] for grey, [N, H, W, C] for
colour) held in memory, or for a streamed image folder a lazy array over the files
(``specdistill.data.stream.FolderImages``: sliced and indexed like one, decoded per read, never
whole); augmentation happens on the fly, per batch (see ``specdistill.data.loading``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from specdistill.config import DataConfig
from specdistill.errors import SpecdistillError
from specdistill.registry import Registry


@dataclass
class Split:
    images: np.ndarray          # uint8, [N, H, W] or [N, H, W, C] (or a lazy FolderImages)
    labels: np.ndarray          # int64, [N], values in [0, num_classes)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {self.images.dtype}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        """Some rows; a lazy (streamed) split stays lazy."""
        return Split(take(self.images, index), self.labels[index])


def take(images: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``images[index]``, except that rows of a streamed split stay lazy (read a batch at a time when
    a model runs on them) instead of being decoded all at once."""
    subset = getattr(images, "subset", None)
    return subset(index) if subset is not None else images[index]


@dataclass
class Dataset:
    name: str
    class_names: list[str]
    train: Split
    val: Split                  # held out: drives clustering, early stopping, every tuning choice
    test: Split                 # only ever used for the final evaluation
    meta: dict = field(default_factory=dict)   # e.g. which fonts went to which split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return 1 if self.train.images.ndim == 3 else self.train.images.shape[-1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[1]

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise SpecdistillError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)


DATA_SOURCES: Registry = Registry("data source")


def load_data(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Load (rendering and caching first if needed) the configured source, applying ``cfg.limit``."""
    _import_sources()
    dataset = DATA_SOURCES.get(cfg.source)(cfg, seed)
    if cfg.limit is not None:  # the same subset for every model of an experiment, whatever its seed
        rng = np.random.default_rng(cfg.data_seed)
        for name in ("train", "val", "test"):
            split = dataset.split(name)
            if len(split) > cfg.limit:
                keep = np.sort(rng.choice(len(split), cfg.limit, replace=False))
                setattr(dataset, name, split.subset(keep))
    if cfg.eval_limit is not None:   # fewer held-out and test examples only (a large K's evaluation)
        rng = np.random.default_rng([cfg.data_seed, 1])
        for name in ("val", "test"):
            split = dataset.split(name)
            if len(split) > cfg.eval_limit:
                keep = np.sort(rng.choice(len(split), cfg.eval_limit, replace=False))
                setattr(dataset, name, split.subset(keep))
    return dataset


def _import_sources() -> None:
    # importing the modules registers their sources
    from specdistill.data import sources  # noqa: F401
