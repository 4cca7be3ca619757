"""The paper's smaller distillation experiments (sections 3 and 6) on Fashion-MNIST, one command each.

    python benchmarks/bench_paper_fmnist.py [--experiment gap|temperature|missing-class|small-data|
        synthetic-transfer|all] [--quick] [--config configs/paper-fmnist.yaml] [--set KEY=VALUE ...]
        [--seed N] [--work-dir DIR | --no-cache] [--threads 1] [--progress]

Prints, per experiment, our numbers next to the paper's (MNIST, or speech for experiment 4).
Trained models are kept in the work directory (default runs/paper-fmnist/{full,quick}) under the
hash of everything that determines them, so experiments share the large net and a second run only
evaluates; use a new --work-dir (or --no-cache) to time a run from scratch. ``--quick`` runs every
code path on 4,000 examples per split with fewer epochs and grids (25 s on a quiet machine).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from paper.lab import Lab  # noqa: E402
from paper.run import EXPERIMENT_ORDER, run_experiments  # noqa: E402
from specdistill.artifacts import write_json  # noqa: E402
from specdistill.config import load_config  # noqa: E402
from specdistill.data import load_data  # noqa: E402
from specdistill.errors import exit_on_error  # noqa: E402

QUICK = ["data.limit=4000", "generalist.train.epochs=3", "student.train.epochs=3",
         "paper.widths=[30, 300]", "paper.temperatures=[1, 4, 20]", "paper.alphas=[0.5, 1.0]",
         "paper.small_train.epochs=4", "paper.synthetic_copies=4"]


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    return (f"{os.cpu_count()}-core CPU ({cpu}), {gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"load average {load}")


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="all", choices=[*EXPERIMENT_ORDER, "all"])
    parser.add_argument("--quick", action="store_true", help="every code path at a small size")
    parser.add_argument("--config", default="configs/paper-fmnist.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--work-dir", default=None, help="where trained models are kept")
    parser.add_argument("--no-cache", action="store_true", help="keep no models on disk")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, oversubscribed CPU a second thread mostly spins)")
    parser.add_argument("--progress", action="store_true", help="show the training progress bars")
    args = parser.parse_args(argv)

    overrides = (QUICK if args.quick else []) + args.set + ([f"seed={args.seed}"] if args.seed is not None else [])
    cfg = load_config(args.config, overrides)
    torch.set_num_threads(args.threads)
    work_dir = None if args.no_cache else Path(args.work_dir or cfg.run_path / ("quick" if args.quick else "full"))
    names = list(EXPERIMENT_ORDER) if args.experiment == "all" else [args.experiment]

    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"  [{time.perf_counter() - start:6.0f}s] {message}", file=sys.stderr, flush=True)

    dataset = load_data(cfg.data, cfg.seed)
    lab = Lab(cfg, dataset, work_dir, progress=args.progress, log=log)
    command = "python benchmarks/bench_paper_fmnist.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"command: {command.strip()}")
    print(f"machine: {machine()}")
    print(f"date: {datetime.date.today().isoformat()}")
    print(f"data: {dataset.name}, {len(dataset.train)} train / {len(dataset.val)} held-out / {len(dataset.test)} test, "
          f"{dataset.num_classes} classes; seed {cfg.seed}; work dir {work_dir or '(none)'}\n")
    results = {}
    for name in names:
        began, trained = time.perf_counter(), lab.trained
        result = run_experiments(lab, [name])[0]
        print(result.markdown())
        print(f"_{name}: {time.perf_counter() - began:.0f} s, {lab.trained - trained} models trained_\n", flush=True)
        results[name] = result.data
    total = time.perf_counter() - start
    print(f"total: {total:.0f} s wall ({total / 60:.1f} min), {lab.trained} models trained "
          f"({lab.train_seconds:.0f} s training), {lab.loaded} loaded from the work dir; "
          f"load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if work_dir is not None:
        write_json(work_dir / f"results-{args.experiment}.json",
                   {"command": command, "config": cfg.model_dump(mode="json"), "results": results, "seconds": total})


if __name__ == "__main__":
    main()
