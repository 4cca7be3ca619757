"""synthetic: K classes in planted confusable groups, generated in seconds even for K = 20,000.

Each group has a random smooth prototype image; each class in the group is the prototype plus a
small smooth perturbation of its own; each example is its class image plus smooth and pixel noise.
Classes of different groups are far apart, classes of one group differ by little more than the
noise, so a classifier confuses classes *within* groups: exactly the structure the clustering stage
must recover. :func:`planted_groups` gives the truth to compare its clusters with.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from specdistill.config import DataConfig
from specdistill.data import DATA_SOURCES, Dataset, Split

CELLS = 6                # smooth patterns have about CELLS x CELLS degrees of freedom
CLASS_DELTA = 0.15       # size of a class's own perturbation (prototypes have unit size)
SMOOTH_NOISE = 0.3       # per-example smooth noise
PIXEL_NOISE = 0.2        # per-example white noise
GREY_SCALE = 48.0        # uint8 value = 128 + GREY_SCALE * x
_CHUNK = 512             # classes generated at a time (fixed, so results do not depend on memory)


def planted_groups(num_classes: int, group_size: int, seed: int = 0) -> list[np.ndarray]:
    """The planted groups: a seeded random partition of the classes into groups of ``group_size``
    (the last one smaller if needed). Class ids are shuffled, so neighbouring ids are not a hint."""
    order = np.random.default_rng([seed, num_classes, group_size]).permutation(num_classes)
    return [np.sort(order[i:i + group_size]) for i in range(0, num_classes, group_size)]


@functools.lru_cache(maxsize=4)
def _smooth_basis(size: int) -> np.ndarray:
    """[CELLS*CELLS, size*size]: bicubic upsampling of each coarse cell, scaled so that a pattern
    ``normal @ basis`` has unit variance on average (one matmul instead of n interpolations)."""
    impulses = torch.eye(CELLS * CELLS).reshape(-1, 1, CELLS, CELLS)
    basis = F.interpolate(impulses, size=(size, size), mode="bicubic", align_corners=False).reshape(
        CELLS * CELLS, -1).numpy()
    return (basis / np.sqrt((basis ** 2).sum(0).mean())).astype(np.float32)


def _smooth(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``n`` smooth random patterns [n, size, size] with unit variance on average."""
    coarse = rng.standard_normal((n, CELLS * CELLS), dtype=np.float32)
    return (coarse @ _smooth_basis(size)).reshape(n, size, size)


def class_images(num_classes: int, group_size: int, image_size: int, seed: int = 0) -> np.ndarray:
    """float32 [K, H, W]: prototype of the class's group plus the class's own small perturbation."""
    groups = planted_groups(num_classes, group_size, seed)
    rng = np.random.default_rng([seed, 1])
    prototypes = _smooth(rng, len(groups), image_size)
    group_of = np.empty(num_classes, np.int64)
    for g, members in enumerate(groups):
        group_of[members] = g
    return prototypes[group_of] + CLASS_DELTA * _smooth(rng, num_classes, image_size)


def make_split(means: np.ndarray, per_class: int, seed: list[int]) -> Split:
    """``per_class`` noisy examples of every class, as uint8 [K*per_class, H, W], grouped by class."""
    num_classes, size = means.shape[0], means.shape[-1]
    images = np.empty((num_classes * per_class, size, size), np.uint8)
    for start in range(0, num_classes, _CHUNK):
        ids = np.arange(start, min(start + _CHUNK, num_classes))
        rng = np.random.default_rng(seed + [start])
        n = ids.size * per_class
        x = np.repeat(means[ids], per_class, axis=0)
        x += SMOOTH_NOISE * _smooth(rng, n, size)
        x += PIXEL_NOISE * rng.standard_normal(x.shape, dtype=np.float32)
        images[start * per_class:start * per_class + n] = np.clip(128 + GREY_SCALE * x, 0, 255).round()
    return Split(images, np.repeat(np.arange(num_classes), per_class))


@DATA_SOURCES.register("synthetic")
def load_synthetic(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Generated on the fly (not cached: it is faster to make than to read). ``seed`` is unused so
    that every model of an experiment sees the same data; ``cfg.data_seed`` seeds it."""
    num_classes = cfg.num_classes or 100
    means = class_images(num_classes, cfg.group_size, cfg.image_size, cfg.data_seed)
    held_out = max(2, cfg.examples_per_class // 4)
    splits = {name: make_split(means, per_class, [cfg.data_seed, 2 + i])
              for i, (name, per_class) in enumerate(
                  [("train", cfg.examples_per_class), ("val", held_out), ("test", held_out)])}
    groups = planted_groups(num_classes, cfg.group_size, cfg.data_seed)
    width = len(str(num_classes - 1))
    meta = {"groups": [g.tolist() for g in groups], "group_size": cfg.group_size,
            "examples_per_class": {"train": cfg.examples_per_class, "val": held_out, "test": held_out}}
    return Dataset("synthetic", [f"c{i:0{width}d}" for i in range(num_classes)],
                   splits["train"], splits["val"], splits["test"], meta)
