"""Images/s of specdistill's training engine against a bare PyTorch loop, side by side.

Same model, same in-memory uint8 tensors, same batch size and optimizer; the bare loop does only
forward, backward and step. The engine adds the schedule, progress bar, metric bookkeeping,
held-out evaluation and the per-epoch checkpoint (its cost is included). Augmentation is off in
both (it is extra work, not overhead). Rounds alternate engine/bare to share the machine's noise.

    python benchmarks/bench_engine.py [--rounds 3] [--examples 4096]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from specdistill.config import ModelConfig, TrainConfig
from specdistill.data import Split
from specdistill.data.loading import to_float, train_loader
from specdistill.engine import fit, make_optimizer
from specdistill.models import build_model


def bare_loop(model, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> float:
    opt = make_optimizer(model, cfg)
    model.train()
    start = time.perf_counter()
    perm = torch.randperm(len(labels))
    steps = len(labels) // cfg.batch_size
    for i in range(steps):
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        x = to_float(images[idx])
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def engine_loop(model, train: Split, val: Split, cfg: TrainConfig, out_dir: str) -> float:
    loader = train_loader(train, cfg.batch_size, seed=0)
    start = time.perf_counter()
    fit(model, loader, val, cfg, out_dir, progress=False)
    return len(loader) * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = (rng.random((args.examples, 32, 32)) * 255).astype(np.uint8)
    labels = rng.integers(0, args.classes, args.examples)
    train = Split(images, labels)
    val = Split(images[:256], labels[:256])
    cfg = TrainConfig(epochs=1, batch_size=128, lr=0.05)
    mcfg = ModelConfig(depth=20, width=16)
    engine, bare = [], []
    for r in range(args.rounds):
        torch.manual_seed(r)
        bare.append(bare_loop(build_model(mcfg, args.classes, 1, 32), torch.from_numpy(images),
                              torch.from_numpy(labels), cfg))
        torch.manual_seed(r)
        with tempfile.TemporaryDirectory() as tmp:
            engine.append(engine_loop(build_model(mcfg, args.classes, 1, 32), train, val, cfg, tmp))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device cpu")
    print(f"model resnet_cifar depth 20 width 16, {args.classes} classes, 32x32 grey, batch {cfg.batch_size}, "
          f"{args.examples} examples/epoch, {args.rounds} alternating rounds")
    print("| loop | images/s (median) | per round |")
    print("|---|---|---|")
    print(f"| bare PyTorch | {np.median(bare):.0f} | {', '.join(f'{v:.0f}' for v in bare)} |")
    print(f"| specdistill engine (incl. val + checkpoint) | {np.median(engine):.0f} | "
          f"{', '.join(f'{v:.0f}' for v in engine)} |")
    print(f"ratio engine/bare: {np.median(engine) / np.median(bare):.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
