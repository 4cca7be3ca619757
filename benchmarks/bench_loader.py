"""The streaming training loader against torchvision's reference DataLoader, on the same folder.

    python benchmarks/bench_loader.py [--images 500] [--size 224] [--batch 32] [--workers N]

Writes a class-folder tree of JPEGs of mixed sizes (300-500 px a side, smooth content so they
compress like photographs) into a temporary folder, then reads it for training both ways with the
same batch size, workers, decode (PIL) and transforms (RandomResizedCrop + RandomHorizontalFlip):

- reference: torchvision's classification references, ``datasets.ImageFolder`` with
  ``RandomResizedCrop(size)``, ``RandomHorizontalFlip()``, ``PILToTensor()`` in a ``DataLoader``
  (``shuffle=True``, one example per ``__getitem__``, default collate; no persistent workers, as the
  references have it), and the same again with ``persistent_workers=True``;
- streaming: ``specdistill.data.loading.training_batches`` over the same files (``FolderImages``):
  one whole batch per worker call into one uint8 array, crop and resize in one PIL call, persistent
  workers.

Rounds alternate the loaders (the machine is shared: compare side by side); each measurement is
``--epochs`` full epochs after one warm-up epoch (page cache, worker start), images/s of the median
round. Pinned memory when CUDA is there. The goal is ratio >= 1.0.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from specdistill.config import DataConfig  # noqa: E402
from specdistill.data import Split  # noqa: E402
from specdistill.data.loading import training_batches  # noqa: E402
from specdistill.data.stream import FolderImages, default_workers  # noqa: E402


def write_folder(root: Path, images: int, classes: int, seed: int = 0) -> int:
    """JPEGs of 300-500 px a side: upsampled low-resolution noise plus grain; returns total bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(images):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(300, 501, 2))
        coarse = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.clip(np.asarray(coarse, np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        total += path.stat().st_size
    return total


def reference_loader(root: Path, size: int, batch: int, workers: int, persistent: bool):
    """torchvision's references/classification training data path."""
    from torchvision import datasets, transforms

    dataset = datasets.ImageFolder(str(root), transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]))
    return dataset, torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=torch.cuda.is_available(),
        drop_last=True, persistent_workers=persistent and workers > 0)


def streaming_loader(samples: list[tuple[str, int]], root: Path, size: int, batch: int, workers: int):
    images = FolderImages.of(root, [path for path, _ in samples], size)
    split = Split(images, np.array([label for _, label in samples]))
    cfg = DataConfig(source="imagefolder", root=str(root), image_size=size, stream=True, loader_workers=workers)
    loader, augment = training_batches(split, cfg, batch, seed=0)
    assert augment is None
    return loader


def epochs_per_second(loader, epochs: int, first_epoch: int) -> float:
    """Images/s over ``epochs`` full epochs (``set_epoch`` where the loader has it, as the engine does)."""
    seen = 0
    start = time.perf_counter()
    for epoch in range(first_epoch, first_epoch + epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for images, *_ in loader:
            seen += len(images)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--epochs", type=int, default=2, help="epochs per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None, help="an existing class-folder tree instead")
    args = parser.parse_args()
    print(f"# bench_loader  {datetime.date.today()}  {platform.node()}  {os.cpu_count()} CPUs  "
          f"load average {os.getloadavg()[0]:.1f}  torch {torch.__version__}  "
          f"cuda {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder
        if root is None:
            root = Path(tmp) / "images"
            began = time.perf_counter()
            size = write_folder(root, args.images, args.classes)
            print(f"# wrote {args.images} JPEGs (300-500 px, {size / args.images / 1024:.0f} KiB each) in "
                  f"{time.perf_counter() - began:.0f} s")
        dataset, reference = reference_loader(root, args.size, args.batch, args.workers, persistent=False)
        _, persistent = reference_loader(root, args.size, args.batch, args.workers, persistent=True)
        streaming = streaming_loader(dataset.samples, root, args.size, args.batch, args.workers)
        loaders = {"torchvision reference": reference, "reference + persistent_workers": persistent,
                   "specdistill streaming": streaming}
        print(f"# {len(dataset)} images, {args.size} px, batch {args.batch}, {args.workers} workers, "
              f"{args.epochs} epochs x {args.rounds} rounds (median)")
        for loader in loaders.values():   # warm-up: page cache, worker start
            epochs_per_second(loader, 1, 0)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for r in range(args.rounds):
            order = list(loaders) if r % 2 == 0 else list(reversed(loaders))
            for name in order:
                rates[name].append(epochs_per_second(loaders[name], args.epochs, 1 + r * args.epochs))
        median = {name: statistics.median(values) for name, values in rates.items()}
        base = median["torchvision reference"]
        print(f"{'loader':32s} {'images/s':>9s} {'ratio':>6s}   rounds")
        for name, value in median.items():
            print(f"{name:32s} {value:9.1f} {value / base:6.2f}   " + " ".join(f"{v:.0f}" for v in rates[name]))
        streaming, persistent_rate = median["specdistill streaming"], median["reference + persistent_workers"]
        print(f"ratio streaming / reference: {streaming / base:.2f} "
              f"(vs the persistent-worker reference: {streaming / persistent_rate:.2f})")


if __name__ == "__main__":
    main()
