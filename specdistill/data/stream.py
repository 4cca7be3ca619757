"""Natural images at full size: a split read from its files per batch, never all held in memory.

ImageNet at 224 px would take ~190 GB as one uint8 array; here a split's ``images`` is a
:class:`FolderImages`, a lazy array over the image files (their paths relative to one root, in a
numpy bytes array: a few tens of MB for ImageNet, zero-copy through Ray's object store). It answers
what the stages ask of an image array:

- ``len``, ``shape``, ``ndim``, ``dtype``: the split as if decoded (``[N, size, size, 3]`` uint8);
- ``images[a:b]``, ``images[index_array]``, ``images[mask]``: those images decoded (resize the
  shorter side + centre crop, the evaluation read) into a uint8 array, by a thread pool. A scan in
  order (``predict_logits``, the teacher caches) reads the next slice ahead while the model runs;
- ``subset(index)``: a lazy view (``Split.subset``, ``data.limit``, a specialist's held-out rows);
- ``np.asarray(images)``: refused, because it would decode the whole split.

Training reads go through :func:`stream_loader`: a torch DataLoader whose worker processes each
decode one whole batch with torchvision's classification-reference recipe (RandomResizedCrop +
RandomHorizontalFlip), pinned memory when training on CUDA, yielding the ``(uint8 images
[B, size, size, 3], labels, index)`` batches the engine's loop consumes. An example's crop and flip
are seeded by (seed, epoch, its index), so the same seed and epoch give the same batches whatever
the number of workers, and a resumed run repeats them. A file PIL cannot read stops training with
one line naming it, also when a worker process hit it.

Every node that reads a streamed split needs the image folder at the same path (shared storage):
the specialists' Ray tasks read their own examples from the files.
"""

from __future__ import annotations

import math
import os
import random
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from specdistill.config import DataConfig
from specdistill.data.folder import DECODER_VERSION, decode_centre, open_rgb
from specdistill.errors import SpecdistillError
from specdistill.hashing import digest_arrays, digest_json

RATIO = (3 / 4, 4 / 3)   # RandomResizedCrop's aspect-ratio range (torchvision's default)


def default_workers() -> int:
    """DataLoader workers when ``data.loader_workers`` is unset: the CPUs this process may use, up to 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def describe_stream(cfg: DataConfig, streamed: bool) -> dict[str, Any]:
    """What a streamed source does, for the dataset meta (and so the generalist's meta.json)."""
    from specdistill.data.loading import describe_augment

    return {"stream": streamed, "decode": f"per batch: shorter side to {cfg.image_size}, centre crop (evaluation)",
            "train_augment": describe_augment(cfg, streamed=True),
            "loader_workers": cfg.loader_workers if cfg.loader_workers is not None else default_workers()}


# ----------------------------------------------------------------------------------------------
# The lazy image array


_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One decode pool per process (a forked child makes its own; PIL releases the GIL to decode)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=default_workers(), thread_name_prefix="decode"))
        return _POOL[1]


class FolderImages:
    """A lazy uint8 ``[N, size, size, 3]`` array over image files (see the module docstring)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, root: str | os.PathLike, files: np.ndarray, size: int) -> None:
        self.root = str(root)
        self.files = np.asarray(files, dtype=np.bytes_)     # paths relative to root, os.fsencode'd
        self.size = int(size)
        self._ahead: tuple[int, int, list[Future]] | None = None
        self._last_stop: int | None = None

    @classmethod
    def of(cls, root: str | os.PathLike, paths: list[str], size: int) -> FolderImages:
        """From absolute (or root-relative) paths under ``root``."""
        root = str(root)
        relative = [os.fsencode(os.path.relpath(path, root)) for path in paths]
        return cls(root, np.array(relative, dtype=np.bytes_) if relative else np.zeros(0, np.bytes_), size)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), self.size, self.size, 3)

    def path(self, i: int) -> str:
        return self._join(self.files[i])

    def _join(self, relative: bytes) -> str:
        return os.path.join(self.root, os.fsdecode(relative))

    def fingerprint(self) -> str:
        """Names the images by their files and how they are read (not their bytes: never read whole)."""
        return digest_json(["FolderImages", DECODER_VERSION, self.root, self.size, digest_arrays(self.files)])

    def __repr__(self) -> str:
        return f"FolderImages({len(self)} files under {self.root}, {self.size} px)"

    def __getstate__(self) -> dict[str, Any]:   # pickled to Ray workers and DataLoader workers
        return {"root": self.root, "files": self.files, "size": self.size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["files"], state["size"])

    def __array__(self, dtype=None, copy=None):
        raise SpecdistillError(
            f"{self!r} is streamed from its files and never decoded whole; read it in slices "
            "(images[a:b]) or through the training loader (specdistill.data.loading.training_batches)")

    def subset(self, index) -> FolderImages:
        """A lazy view of some rows (an index array, a boolean mask or a slice)."""
        return FolderImages(self.root, np.atleast_1d(self.files[index]), self.size)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return decode_centre(self.path(index), self.size)
        if isinstance(index, slice) and index.step in (None, 1):
            start, stop, _ = index.indices(len(self))
            return self._read_range(start, max(start, stop))
        return self._decode(self._submit(np.atleast_1d(self.files[index])))

    def _submit(self, files: np.ndarray) -> list[Future]:
        pool, size = _pool(), self.size
        return [pool.submit(decode_centre, self._join(relative), size) for relative in files]

    def _decode(self, futures: list[Future]) -> np.ndarray:
        out = np.empty((len(futures), self.size, self.size, 3), np.uint8)
        try:
            for i, future in enumerate(futures):
                out[i] = future.result()
        finally:
            for future in futures:
                future.cancel()
        return out

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        """``[start, stop)`` decoded; a scan in order gets the next slice read ahead meanwhile."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (start, stop):
            futures = ahead[2]
        else:
            if ahead is not None:
                for future in ahead[2]:
                    future.cancel()
            futures = self._submit(self.files[start:stop])
        if self._last_stop == start and stop < len(self):   # sequential: read the next slice ahead
            following = min(len(self), stop + (stop - start))
            self._ahead = (stop, following, self._submit(self.files[stop:following]))
        self._last_stop = stop
        return self._decode(futures)


def is_streamed(images: Any) -> bool:
    return isinstance(images, FolderImages)


# ----------------------------------------------------------------------------------------------
# Training reads: a DataLoader with workers over the files


def example_seed(seed: int, epoch: int, index: int) -> int:
    """The crop-and-flip seed of one example in one epoch: the same whatever worker reads it."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2 ** 63)


def crop_box(width: int, height: int, scale: tuple[float, float], draw: random.Random) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop: torchvision's ``RandomResizedCrop.get_params``
    step for step (ten tries at an area share in ``scale`` and an aspect ratio log-uniform in
    :data:`RATIO`, else the central crop with the ratio clamped), drawn from ``draw``, not from
    torch's global RNG (seeding that per example costs more than decoding the image)."""
    area = width * height
    low, high = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * draw.uniform(*scale)
        aspect = math.exp(draw.uniform(low, high))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return draw.randint(0, height - h), draw.randint(0, width - w), h, w
    if width / height < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif width / height > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image, size: int, scale: tuple[float, float], seed: int) -> np.ndarray:
    """torchvision's RandomResizedCrop(size, scale) + RandomHorizontalFlip on a PIL image, drawn from
    ``seed``; uint8 [size, size, 3]. PIL's resize of the crop box (bilinear, antialiased, as
    torchvision resizes a PIL image) does torchvision's crop-then-resize in one pass."""
    from PIL import Image

    draw = random.Random(seed)
    top, left, height, width = crop_box(image.width, image.height, scale, draw)
    out = image.resize((size, size), Image.BILINEAR, box=(left, top, left + width, top + height))
    if draw.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


class Unreadable:
    """What a DataLoader worker hands back for a batch with a bad file: the one-line message (torch
    would re-raise the worker's exception with its traceback folded into the message)."""

    def __init__(self, message: str) -> None:
        self.message = message


class FolderBatches(TorchDataset):
    """Indexed by ``(epoch, index array)``: one whole batch, decoded in the worker that gets it."""

    def __init__(self, images: FolderImages, labels: np.ndarray, augment: bool, scale: tuple[float, float],
                 seed: int) -> None:
        self.images, self.labels = images, torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.augment, self.scale, self.seed = augment, tuple(scale), seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, np.ndarray]):
        epoch, index = item
        size = self.images.size
        batch = np.empty((len(index), size, size, 3), np.uint8)
        try:
            for row, i in enumerate(index):
                path = self.images.path(int(i))
                if self.augment:
                    batch[row] = random_resized_crop(open_rgb(path), size, self.scale,
                                                     example_seed(self.seed, epoch, int(i)))
                else:
                    batch[row] = decode_centre(path, size)
        except SpecdistillError as exc:
            return Unreadable(str(exc))
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return torch.from_numpy(batch), self.labels[index], index


class EpochTagged(Sampler):
    """Wraps a batch sampler (``EpochBatchSampler``, ``SpecialistBatchSampler``): yields ``(epoch,
    index array)`` so workers seed each example's crop by its epoch; ``set_epoch`` passes through."""

    def __init__(self, batches: Sampler) -> None:
        self.batches = batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for index in self.batches:
            yield self.epoch, index

    def __len__(self) -> int:
        return len(self.batches)


class StreamLoader(DataLoader):
    """A DataLoader that turns a worker's :class:`Unreadable` batch into the one-line error."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, Unreadable):
                raise SpecdistillError(batch.message)
            yield batch


def stream_loader(images: FolderImages, labels: np.ndarray, batches: Sampler, cfg: DataConfig, seed: int = 0,
                  pin_memory: bool = False) -> StreamLoader:
    """Training batches read from the files by ``data.loader_workers`` processes (see the module
    docstring); augmented when ``data.augment``, else the evaluation read."""
    workers = cfg.loader_workers if cfg.loader_workers is not None else default_workers()
    dataset = FolderBatches(images, labels, cfg.augment, cfg.crop_scale, seed)
    return StreamLoader(dataset, sampler=EpochTagged(batches), batch_size=None, num_workers=workers,
                        pin_memory=pin_memory, persistent_workers=workers > 0,
                        prefetch_factor=2 if workers > 0 else None)
