"""How often a finished run's ensemble consults a specialist on the views a student trains on.

    python benchmarks/bench_teacher_views.py configs/hanzi-1k.yaml --run-dir /work/runs/h1k-mix [--images 4096]

Where the held-out gate stays shut the ensemble is the (calibrated) generalist, so only the views on
which it consults a specialist can teach a student what the specialists add. This scores a random
sample of training images through the run's own ensemble (``student.teachers.loaded_ensemble``:
calibration and gate as the combine stage fitted them) as the student stage would see them: clean (the
teacher cache's view), with the glyph augmentation, and mixed up in pairs at two Beta parameters
(``specdistill.kd.Mix``); the test split for comparison.
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specdistill.config import (
    NATURAL_SOURCES,  # noqa: E402
    load_config,  # noqa: E402
)
from specdistill.data import load_data  # noqa: E402
from specdistill.data.loading import BatchAugment, NaturalBatchAugment, to_float  # noqa: E402
from specdistill.kd import Mix  # noqa: E402
from student.teachers import loaded_ensemble  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--images", type=int, default=4096)
    args = parser.parse_args()
    cfg = load_config(args.config).model_copy(update={"run_dir": args.run_dir})
    torch.manual_seed(0)
    dataset = load_data(cfg.data, cfg.seed)
    ensemble = loaded_ensemble(cfg, dataset, torch.device("cpu"))
    pick = np.sort(np.random.default_rng(0).choice(len(dataset.train), min(args.images, len(dataset.train)),
                                                   replace=False))
    clean = to_float(torch.as_tensor(np.asarray(dataset.train.images[pick])))
    augment = NaturalBatchAugment(cfg.data.crop_scale) if cfg.data.source in NATURAL_SOURCES else BatchAugment()
    augmented = augment(clean)
    views = {"clean training images": clean, "augmented": augmented}
    for a in (0.2, 1.0):
        views[f"augmented, mixed up, Beta({a:g}, {a:g})"] = Mix.draw(len(clean), a, "cpu").images(augmented)
    test = np.sort(np.random.default_rng(1).choice(len(dataset.test), min(args.images, len(dataset.test)),
                                                   replace=False))   # a sample over every class, as for training
    views["test images"] = to_float(torch.as_tensor(np.asarray(dataset.test.images[test])))
    print(f"# {args.run_dir}: {len(ensemble)} specialists, {len(clean)} images per view; "
          f"{date.today()}, {platform.machine()}, torch {torch.__version__}")
    print("| view | share consulting a specialist | specialists per view |\n|---|---:|---:|")
    for name, x in views.items():
        active = torch.cat([ensemble.log_probs_and_active(x[i:i + 512], cfg.combine)[1]
                            for i in range(0, len(x), 512)])
        print(f"| {name} | {active.any(1).float().mean():.1%} | {active.sum(1).float().mean():.2f} |")


if __name__ == "__main__":
    main()
