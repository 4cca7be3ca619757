"""From uint8 arrays in memory to float batches on the device, with augmentation on the fly.

Batches are drawn by a *batch sampler* that yields index arrays, and the dataset gathers a whole
batch with one fancy-indexing call: for in-memory tensors that is far cheaper than a DataLoader
collating one example at a time. Augmentation runs per batch on the device (one affine_grid /
grid_sample call with a different random matrix per example), so it costs little on a GPU and
stays deterministic for a seed.

Which loader and which augmentation a source gets is decided in one place, :func:`training_batches`:
glyph sources (glyphs-latin, glyphs-hanzi, fashion-mnist, synthetic) their cached arrays and the
glyph jitter :class:`BatchAugment`; natural sources (imagefolder, cifar100) torchvision's training
recipe, RandomResizedCrop + horizontal flip: per example in DataLoader workers for a streamed image
folder (:mod:`specdistill.data.stream`), per batch on the device (:class:`NaturalBatchAugment`) for
images held in memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from specdistill.config import NATURAL_SOURCES, DataConfig
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


class NaturalBatchAugment(torch.nn.Module):
    """RandomResizedCrop + horizontal flip for every example of a batch held in memory, on its device.

    torchvision's recipe for natural images, drawn per example as its ``RandomResizedCrop`` draws:
    a crop of ``scale`` times the image's area with an aspect ratio log-uniform in ``ratio`` (up to
    ten tries for one that fits, else the whole image), placed uniformly, resized back to the full
    size (one affine_grid / grid_sample call for the batch, bilinear), then flipped with probability
    one half. The images were centre-cropped when they were decoded, so crops come from that square.
    """

    def __init__(self, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 tries: int = 10) -> None:
        super().__init__()
        self.scale, self.ratio, self.tries = tuple(scale), tuple(ratio), tries

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        area = torch.empty(b, self.tries).uniform_(*self.scale, generator=generator)
        ratio = torch.empty(b, self.tries).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]),
                                                    generator=generator).exp()
        crop_w = (area * ratio * h / w).sqrt()          # shares of the image's width and height
        crop_h = (area / ratio * w / h).sqrt()
        fits = (crop_w <= 1) & (crop_h <= 1)
        first = fits.int().argmax(1, keepdim=True)       # the first try that fits, as torchvision takes
        found = fits.any(1)
        crop_w = torch.where(found, crop_w.gather(1, first)[:, 0], torch.ones(b))
        crop_h = torch.where(found, crop_h.gather(1, first)[:, 0], torch.ones(b))
        centre_x = torch.rand(b, generator=generator) * (1 - crop_w) + crop_w / 2
        centre_y = torch.rand(b, generator=generator) * (1 - crop_h) + crop_h / 2
        mirror = 1.0 - 2.0 * (torch.rand(b, generator=generator) < 0.5).float()
        zero = torch.zeros(b)
        theta = torch.stack([torch.stack([crop_w * mirror, zero, 2 * centre_x - 1], 1),
                             torch.stack([zero, crop_h, 2 * centre_y - 1], 1)], 1).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def describe_augment(cfg: DataConfig, streamed: bool) -> str:
    """The training augmentation a source gets, in words (recorded in the dataset's meta)."""
    if not cfg.augment:
        return "none"
    if cfg.source not in NATURAL_SOURCES:
        return "glyph jitter per batch on the device (BatchAugment: rotation, scale, shear, shift, contrast, noise)"
    crop = f"scale {list(cfg.crop_scale)}, ratio [3/4, 4/3]"
    if streamed:
        return f"RandomResizedCrop({cfg.image_size}, {crop}) + RandomHorizontalFlip per example in DataLoader workers"
    return f"random resized crop ({crop}) + horizontal flip per example on the device (NaturalBatchAugment)"


def training_batches(split: Split, cfg: DataConfig, batch_size: int | None = None, seed: int = 0,
                     labels: np.ndarray | None = None, sampler: Sampler | None = None,
                     device: torch.device | str | None = None) -> tuple[DataLoader, torch.nn.Module | None]:
    """The training loader over ``split`` and the batch augmentation ``engine.fit`` applies on the device.

    The one place that decides both for every stage (generalist, specialists, student): a streamed
    split (:class:`~specdistill.data.stream.FolderImages`) gets a DataLoader whose workers read and
    augment the files (no device augmentation); a split in memory gets whole-batch indexing plus
    :class:`NaturalBatchAugment` (natural sources) or :class:`BatchAugment` (glyphs), when
    ``data.augment``. Batches come from ``sampler`` (e.g. the specialists' half/half batches), by
    default shuffled ``batch_size`` batches reseeded per epoch; ``labels`` replace the split's.
    """
    from specdistill.data.stream import is_streamed, stream_loader

    if sampler is None:
        if batch_size is None:
            raise ValueError("training_batches needs a batch_size or a sampler")
        sampler = EpochBatchSampler(len(split), batch_size, seed, shuffle=True, drop_last=len(split) > batch_size)
    if is_streamed(split.images):
        pin = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return stream_loader(split.images, split.labels if labels is None else labels, sampler, cfg, seed,
                             pin_memory=pin), None
    loader = batch_loader(ArrayDataset(split, labels), sampler)
    if not cfg.augment:
        return loader, None
    if cfg.source in NATURAL_SOURCES:
        return loader, NaturalBatchAugment(cfg.crop_scale)
    return loader, BatchAugment()
