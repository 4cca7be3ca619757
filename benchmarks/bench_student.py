"""A student epoch with the cached teacher against an epoch on hard labels (goal: at most 1.2x).

    python benchmarks/bench_student.py [--source glyphs-latin] [--limit 4000] [--repeats 3]
    python benchmarks/bench_student.py --random-classes 3755    # a hanzi-sized label space

Each epoch is a fresh default student (``student.model``) trained for one epoch by
``specdistill.engine.fit`` with augmentation, so the numbers include everything a real epoch does.
Modes, run interleaved ``--repeats`` times (medians reported, ratios against ``hard``):

* ``hard``   - cross-entropy on the labels;
* ``cached`` - Hinton's loss against the teacher cache (top-k targets looked up by example index);
* ``live``   - Hinton's loss with a generalist-sized teacher run on every batch: what the cache
  saves. The ensemble teacher would cost this teacher forward once per active specialist more.

The teacher's weights are random: only speed is measured here, and a forward pass costs the same
whatever the weights. The one-off cost of building the cache (one teacher forward over the
training split) is printed against a hard-label epoch.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specdistill.config import DataConfig, ModelConfig, StudentConfig, TrainConfig  # noqa: E402
from specdistill.data import Dataset, Split, load_data  # noqa: E402
from specdistill.data.loading import BatchAugment, train_loader  # noqa: E402
from specdistill.engine import fit  # noqa: E402
from specdistill.kd import Distiller, build_loss  # noqa: E402
from specdistill.models import build_model  # noqa: E402
from student.cache import build_cache  # noqa: E402
from student.teachers import models_teacher  # noqa: E402


def random_dataset(num_classes: int, num_train: int, image_size: int, seed: int = 0) -> Dataset:
    """Random pixels with ``num_classes`` labels: the speed of a large label space, nothing else."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        return Split(rng.integers(0, 256, (n, image_size, image_size), dtype=np.uint8),
                     rng.integers(0, num_classes, n))

    return Dataset(f"random-{num_classes}", [str(i) for i in range(num_classes)], split(num_train),
                   split(16), split(16))


def one_epoch(mode: str, dataset: Dataset, student_cfg: ModelConfig, train: TrainConfig, cache,
              teacher: torch.nn.Module, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    student = build_model(student_cfg, dataset.num_classes, dataset.channels, dataset.image_size)
    if mode == "hard":
        objective = None
    else:
        loss = build_loss("hinton", temperature=4.0, alpha=0.9)
        objective = Distiller(student, loss, cache if mode == "cached" else teacher).objective
    loader = train_loader(dataset.train, train.batch_size, seed)
    began, cpu = time.perf_counter(), time.process_time()
    fit(student, loader, None, train, None, objective=objective, seed=seed, device="cpu",
        augment=BatchAugment(), progress=False)
    return time.perf_counter() - began, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="glyphs-latin")
    parser.add_argument("--limit", type=int, default=4000, help="training examples (data.limit)")
    parser.add_argument("--random-classes", type=int, default=None,
                        help="use random pixels with this many classes instead of --source")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-live", action="store_true", help="skip the live-teacher epochs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.random_classes:
        dataset = random_dataset(args.random_classes, args.limit, args.image_size)
    else:
        dataset = load_data(DataConfig(source=args.source, image_size=args.image_size, limit=args.limit))
    student_cfg = StudentConfig().model
    teacher_cfg = ModelConfig()   # the generalist's default architecture
    torch.manual_seed(0)
    teacher = build_model(teacher_cfg, dataset.num_classes, dataset.channels, dataset.image_size).eval()
    train = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, amp=False)

    print(f"command: python benchmarks/bench_student.py {' '.join(sys.argv[1:])}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, CPU")
    print(f"data: {dataset.name}, {len(dataset.train)} training examples, {dataset.num_classes} classes, "
          f"{dataset.image_size}x{dataset.image_size}x{dataset.channels}")
    print(f"student: {student_cfg.name} depth {student_cfg.depth} width {student_cfg.width}; teacher: "
          f"{teacher_cfg.name} depth {teacher_cfg.depth} width {teacher_cfg.width}; top-k {args.top_k}")

    began, began_cpu = time.perf_counter(), time.process_time()
    cache = build_cache(models_teacher([teacher], torch.device("cpu"), 512), dataset.train.images,
                        args.top_k, key="bench", progress=False)
    build_seconds, build_cpu = time.perf_counter() - began, time.process_time() - began_cpu

    modes = ["hard", "cached"] + ([] if args.no_live else ["live"])
    one_epoch("hard", dataset, student_cfg, train, cache, teacher, seed=99)   # warm-up
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for mode in modes:
            w, c = one_epoch(mode, dataset, student_cfg, train, cache, teacher, seed=r)
            wall[mode].append(w)
            cpu[mode].append(c)

    # CPU seconds of this process are the steadier measure on a shared machine (other jobs stretch
    # wall time, not the work done); both are printed
    hard_wall, hard_cpu = statistics.median(wall["hard"]), statistics.median(cpu["hard"])
    print()
    print(f"{'mode':<8} {'wall s/epoch':>12} {'x hard':>7} {'CPU s/epoch':>12} {'x hard':>7} {'images/s':>9}"
          "   wall runs | CPU runs")
    for mode in modes:
        mw, mc = statistics.median(wall[mode]), statistics.median(cpu[mode])
        runs = ", ".join(f"{t:.2f}" for t in wall[mode]) + " | " + ", ".join(f"{t:.2f}" for t in cpu[mode])
        print(f"{mode:<8} {mw:>12.2f} {mw / hard_wall:>7.2f} {mc:>12.2f} {mc / hard_cpu:>7.2f} "
              f"{len(dataset.train) / mw:>9.0f}   {runs}")
    ratio_wall = statistics.median(wall["cached"]) / hard_wall
    ratio_cpu = statistics.median(cpu["cached"]) / hard_cpu
    print()
    print(f"cached teacher / hard labels per epoch: {ratio_cpu:.2f}x CPU time, {ratio_wall:.2f}x wall time "
          f"(goal <= 1.2x: {'met' if ratio_cpu <= 1.2 else 'MISSED'} on CPU time)")
    megabytes = (cache.log_probs.numel() * 2 + cache.indices.numel() * 4 + cache.residual.numel() * 4) / 2**20
    print(f"building the cache once: {build_seconds:.2f} s wall, {build_cpu:.2f} s CPU = "
          f"{build_cpu / hard_cpu:.2f} hard-label epochs (CPU); "
          f"cache size {megabytes:.2f} MB "
          f"({dataset.num_classes} classes, dense float32 would be "
          f"{len(dataset.train) * dataset.num_classes * 4 / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
