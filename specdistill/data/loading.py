"""From uint8 arrays in memory to float batches on the device, with augmentation on the fly.

Batches are drawn by a *batch sampler* that yields index arrays, and the dataset gathers a whole
batch with one fancy-indexing call: for in-memory tensors that is far cheaper than a DataLoader
collating one example at a time. Augmentation runs per batch on the device (one affine_grid /
grid_sample call with a different random matrix per example), so it costs little on a GPU and
stays deterministic for a seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from specdistill.data import Split


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W] or [B,H,W,C] -> float [B,C,H,W] scaled to about [-1, 1]."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    else:
        images = images.permute(0, 3, 1, 2)
    return images.float().div_(127.5).sub_(1.0)


class ArrayDataset(TorchDataset):
    """A split as tensors; indexing with an array of indices returns a whole batch at once."""

    def __init__(self, split: Split, labels: np.ndarray | None = None) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(split.images))
        self.labels = torch.from_numpy(np.asarray(split.labels if labels is None else labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        return self.images[index], self.labels[index], index


class EpochBatchSampler(Sampler):
    """Yields index arrays; ``set_epoch`` reseeds, so a resumed run sees the same batches."""

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng((self.seed, self.epoch)).permutation(self.num_examples)

    def __iter__(self):
        order = self.order()
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        for start in range(0, stop, self.batch_size):
            yield order[start:start + self.batch_size]

    def __len__(self) -> int:
        n = len(self.order()) if not self.shuffle else self.num_examples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def batch_loader(dataset: TorchDataset, sampler: EpochBatchSampler) -> DataLoader:
    """A DataLoader over whole-batch indexing (``batch_size=None`` turns off per-example collation)."""
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)


def train_loader(split: Split, batch_size: int, seed: int = 0, labels: np.ndarray | None = None) -> DataLoader:
    """Shuffled batches over a split, reshuffled per epoch (the engine calls ``set_epoch``)."""
    sampler = EpochBatchSampler(len(split), batch_size, seed, shuffle=True, drop_last=len(split) > batch_size)
    return batch_loader(ArrayDataset(split, labels), sampler)


class BatchAugment(torch.nn.Module):
    """Random affine (rotation, scale, shear, shift), contrast and noise, per example of a batch.

    Rendered glyphs are perfectly centred and clean; test fonts are not the train fonts, so the
    model must not rely on exact positions or stroke widths.
    """

    def __init__(self, degrees: float = 8.0, scale: tuple[float, float] = (0.9, 1.1), shear: float = 0.15,
                 translate: float = 0.08, contrast: tuple[float, float] = (0.7, 1.2), noise: float = 0.05):
        super().__init__()
        self.degrees, self.scale, self.shear, self.translate = degrees, scale, shear, translate
        self.contrast, self.noise = contrast, noise

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, dev = x.shape[0], x.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return (torch.rand(b, generator=generator) * (hi - lo) + lo).to(dev)

        angle = uniform(-self.degrees, self.degrees) * math.pi / 180
        scale = uniform(*self.scale)
        shear = uniform(-self.shear, self.shear)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([
            torch.stack([cos, -sin + shear, uniform(-self.translate, self.translate) * 2], 1),
            torch.stack([sin, cos, uniform(-self.translate, self.translate) * 2], 1),
        ], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # pad with the background value (-1 = black) rather than zero (mid grey)
        out = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
        c = uniform(*self.contrast).view(b, 1, 1, 1)
        out = (out + 1) * c - 1
        if self.noise:
            out = out + self.noise * torch.randn(out.shape, generator=generator).to(dev)
        return out.clamp_(-1, 1)
