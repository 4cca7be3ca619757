"""Two Ray Train CPU workers (DDP, gloo) against one process on the same work, side by side.

Same data (in-memory uint8 arrays), model, epochs, global batch, optimizer and schedule; the same
``engine.fit`` with ``train.workers`` 1 or 2 and the same CPUs in all: one process with
``--threads`` torch threads, or ``--threads`` workers with one thread each. Augmentation is off
(it is extra work, not overhead). Each fit writes its checkpoint and metrics as a stage would.

Reported per setup: wall time of the whole ``fit`` call (for the workers: starting Ray Train's
controller and worker processes, shipping model and data through the object store, training,
held-out evaluation, checkpoints, shutdown; the embedded Ray itself is started once beforehand and
timed apart), the training epochs' own time (the engine's per-epoch ``seconds``, all workers in
step) and images/s over each. Overhead = wall time - training time. Rounds alternate the setups.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_ddp.py [--examples 4096] [--epochs 2] [--rounds 1] [--threads 2]

(PASSIVE: idle OpenMP threads sleep instead of spinning, which on a shared machine otherwise
penalises the multi-threaded process; one process with one thread is printed for reference.)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time

import numpy as np
import torch

from specdistill.config import ModelConfig, TrainConfig
from specdistill.data import Split
from specdistill.data.loading import train_loader
from specdistill.engine import fit
from specdistill.models import build_model


def one_fit(train: Split, val: Split, cfg: TrainConfig, mcfg: ModelConfig, classes: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build_model(mcfg, classes, 1, train.images.shape[1])
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        result = fit(model, train_loader(train, cfg.batch_size, seed), val, cfg, tmp, seed=seed, progress=False)
        wall = time.perf_counter() - began
    trained = result["epochs_run"] * (len(train) // cfg.batch_size) * cfg.batch_size
    return {"wall": wall, "train": result["train_seconds"], "images": trained,
            "val_acc": result["history"][-1]["val_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="CPUs in all: one process's threads = workers")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.examples + 512)
    images = (rng.random((len(labels), 32, 32)) * 80).astype(np.uint8)
    for i, y in enumerate(labels):   # learnable: each class lights its own 3x3 block
        images[i, (y // 10 % 10) * 3:(y // 10 % 10) * 3 + 3, (y % 10) * 3:(y % 10) * 3 + 3] = 255
    train, val = Split(images[:args.examples], labels[:args.examples]), Split(images[args.examples:],
                                                                              labels[args.examples:])
    mcfg = ModelConfig(depth=8, width=16)
    base = TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=0.05)
    setups = {"one process, 1 thread": base.model_copy(update={"num_threads": 1}),
              f"one process, {args.threads} threads": base.model_copy(update={"num_threads": args.threads}),
              f"{args.threads} Ray Train workers, 1 thread each":
                  base.model_copy(update={"workers": args.threads, "num_threads": 1, "use_gpu": False})}
    began = time.perf_counter()
    ray.init(address="local", num_cpus=args.threads, include_dashboard=True, logging_level="ERROR")
    ray_start = time.perf_counter() - began
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    for r in range(args.rounds):
        for name, cfg in setups.items():
            runs[name].append(one_fit(train, val, cfg, mcfg, args.classes, seed=r))
    ray.shutdown()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
          f"torch {torch.__version__}, ray {ray.__version__}, device cpu; {datetime.date.today()}")
    print(f"model resnet_cifar depth 8 width 16, {args.classes} classes, 32x32 grey, global batch {args.batch}, "
          f"{args.examples} examples x {args.epochs} epochs, {args.rounds} round(s); embedded Ray started "
          f"once in {ray_start:.1f} s (not counted)")
    print("| setup | wall s | training s | overhead s | images/s (wall) | images/s (training) | val acc |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    medians = {}
    for name, rs in runs.items():
        wall, trained = np.median([x["wall"] for x in rs]), np.median([x["train"] for x in rs])
        images = rs[0]["images"]
        medians[name] = (wall, trained, images)
        print(f"| {name} | {wall:.1f} | {trained:.1f} | {wall - trained:.1f} | {images / wall:.0f} | "
              f"{images / trained:.0f} | {np.median([x['val_acc'] for x in rs]):.3f} |")
    (w1, t1, n), (w2, t2, _) = list(medians.values())[1:]
    print(f"ratio {args.threads} workers / one process with {args.threads} threads, images/s: {w1 / w2:.2f}x over "
          f"the whole fit, {t1 / t2:.2f}x over the training epochs; Ray Train's fixed cost: "
          f"{(w2 - t2) - (w1 - t1):.1f} s more overhead than one process")


if __name__ == "__main__":
    main()
