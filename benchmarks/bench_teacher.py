"""The ensemble as a teacher: specialists run one at a time against stacked into one batched call
(``combine.stacked``), side by side in one run.

    python benchmarks/bench_teacher.py [--repeats 7] [--threads 2]
    python benchmarks/bench_teacher.py --run-dir runs/hanzi-3755-narrow    # a finished run's own ensemble

Two calls of :meth:`combine.ensemble.Ensemble.log_probs`, each timed whole (generalist, activation,
specialists, KL combiner) and for the specialists alone:

* ``live``   - a normalised float batch of 256 images: what ``student.teacher_view: augmented`` runs on
  every training batch;
* ``cached`` - a uint8 batch of 512 images: one step of building the teacher cache.

With ``--run-dir`` and ``--train-steps N`` it also trains the run's student (``student.model``, its
loss, init and schedule) for N steps with the ensemble as a live teacher, each way, and prints the
training images/s (no held-out evaluation): what the student stage sees end to end.

Without ``--run-dir`` the ensemble has hanzi-3755-narrow's shape with random weights: a depth-8,
width-4 resnet_cifar generalist over 3,755 classes at 16 px and 61 specialists of the same net, each
for about 62 classes (a random partition) and a dustbin. Speed does not depend on the weights, only on
how many rows each specialist gets, and a random generalist's top-3 is nearly the same on every image
(a few specialists get every row), so the activation is drawn instead, shaped like the real run's:
each image activates 2 specialists, specialist r with probability proportional to 1 / (r + 4) (the
busiest gets about 9% of the pairs; seed 1 of hanzi-3755-narrow: 521 pairs on 256 training images,
the busiest 47). Both paths' outputs are compared (largest difference printed). Medians of
``--repeats`` interleaved rounds. OpenMP keeps its default wait policy, as in ``specdistill run``:
``OMP_WAIT_POLICY=PASSIVE`` (which ``bench_combine.py`` sets) makes each of the loop's many small
operations wake the threads again and inflated the loop's time 3x here.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from combine.ensemble import Ensemble  # noqa: E402
from specdistill.config import CombineConfig, ModelConfig, load_config  # noqa: E402
from specdistill.data.loading import to_float  # noqa: E402
from specdistill.models import build_model  # noqa: E402
from specdistill.records import SpecialistInfo  # noqa: E402


def synthetic(num_classes: int, num_specialists: int, image_size: int, seed: int = 0) -> tuple[Ensemble, np.ndarray]:
    torch.manual_seed(seed)
    net = ModelConfig(name="resnet_cifar", depth=8, width=4)
    order = np.random.default_rng(seed).permutation(num_classes)
    groups = [sorted(int(c) for c in part) for part in np.array_split(order, num_specialists)]
    specialists = [build_model(net, len(g) + 1, 1, image_size).eval() for g in groups]
    infos = [SpecialistInfo(id=m, classes=g, names=[str(c) for c in g], dustbin_correction=1.0)
             for m, g in enumerate(groups)]
    ensemble = Ensemble(build_model(net, num_classes, 1, image_size).eval(), num_classes, specialists, infos)
    images = np.random.default_rng(seed + 1).integers(0, 256, size=(512, image_size, image_size), dtype=np.uint8)
    rng = np.random.default_rng(seed + 2)
    popularity = 1.0 / (np.arange(num_specialists) + 4.0)
    masks = {}
    for rows in (256, 512):
        mask = torch.zeros(rows, num_specialists, dtype=torch.bool)
        for row in range(rows):
            mask[row, rng.choice(num_specialists, 2, replace=False, p=popularity / popularity.sum())] = True
        masks[rows] = mask
    ensemble.active = lambda gen_log_probs, top_n: masks[len(gen_log_probs)]   # the drawn activation
    return ensemble, images


def from_run(run_dir: Path) -> tuple[Ensemble, np.ndarray, CombineConfig, object, object]:
    from specdistill.data import load_data
    from student.teachers import loaded_ensemble

    cfg = load_config(run_dir / "config.yaml")
    dataset = load_data(cfg.data, cfg.seed)
    ensemble = loaded_ensemble(cfg, dataset, torch.device("cpu"), cfg.student.train.eval_batch_size)
    return ensemble, dataset.train.images[:512], cfg.combine, cfg, dataset


def train_images_per_s(cfg, dataset, ensemble: Ensemble, steps: int) -> float:
    """The run's student trained ``steps`` steps by ``engine.fit`` with the ensemble run on every
    augmented batch (``student.teacher_view: augmented``); training images/s."""
    from specdistill.data.loading import training_batches
    from specdistill.engine import fit
    from specdistill.kd import Distiller, loss_from_config
    from specdistill.models import load_classifier, widen_from
    from specdistill.rundir import RunDir
    from student.teachers import LiveEnsemble

    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student.model, dataset.num_classes, dataset.channels, dataset.image_size)
    if cfg.student.init == "generalist":
        widen_from(student, load_classifier(RunDir.of(cfg).generalist_weights)[0].state_dict())
    distiller = Distiller(student, loss_from_config(cfg.student.loss), LiveEnsemble(ensemble, cfg.combine))
    train = cfg.student.train.model_copy(update={"epochs": 1, "max_steps_per_epoch": steps})
    loader, augment = training_batches(dataset.train, cfg.data, train.batch_size, cfg.seed, device="cpu")
    began = time.perf_counter()
    fit(student, loader, None, train, None, objective=distiller.objective, seed=cfg.seed, desc="bench",
        device="cpu", augment=augment, progress=False)
    return steps * train.batch_size / (time.perf_counter() - began)


def timed(fn, *args) -> float:
    began = time.perf_counter()
    with torch.no_grad():   # as the student's teacher runs
        fn(*args)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a finished run directory (combine stage done)")
    parser.add_argument("--classes", type=int, default=3755)
    parser.add_argument("--specialists", type=int, default=61)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=0,
                        help="with --run-dir: also train the student this many steps each way")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.run_dir:
        ensemble, uint8, rule, cfg, dataset = from_run(args.run_dir)
        what = f"the ensemble of {args.run_dir}"
    else:
        ensemble, uint8 = synthetic(args.classes, args.specialists, args.image_size)
        rule = CombineConfig(top_n=3)
        what = (f"random-weight ensemble: K = {args.classes}, {args.specialists} specialists, "
                f"resnet_cifar depth 8 width 4, {args.image_size} px")
    if ensemble.stacked_specialists() is None:
        raise SystemExit("bench_teacher: these specialists cannot be stacked (combine.stacked.stackable)")
    floats = to_float(torch.as_tensor(uint8[:256]))
    active = {name: ensemble.active(ensemble.generalist_log_probs(batch), rule.top_n)
              for name, batch in (("live", floats), ("cached", uint8))}
    paths = {"loop": False, "stacked": True}   # Ensemble.stack
    outputs = {}
    for path, value in paths.items():
        ensemble.stack = value
        with torch.no_grad():
            outputs[path] = ensemble.log_probs(floats, rule)   # warm-up and the outputs to compare
    times: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.repeats):
        for path, value in paths.items():
            ensemble.stack = value
            for name, batch in (("live", floats), ("cached", uint8)):
                times.setdefault((name, path, "whole"), []).append(timed(ensemble.log_probs, batch, rule))
                times.setdefault((name, path, "specialists"), []).append(
                    timed(ensemble.specialist_outputs, batch, active[name]))
    ensemble.stack = True
    median = {key: statistics.median(values) * 1000 for key, values in times.items()}
    print(f"# bench_teacher: {what}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} threads, median of {args.repeats}, {time.strftime('%Y-%m-%d')}")
    print(f"# largest difference of the two paths' log q on the live batch: "
          f"{float((outputs['loop'] - outputs['stacked']).abs().max()):.1e}")
    print("| batch | active (row, specialist) pairs | path | log_probs ms | specialists ms | "
          "log_probs vs loop | specialists vs loop |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, size in (("live", 256), ("cached", 512)):
        for path in paths:
            whole, spec = median[(name, path, "whole")], median[(name, path, "specialists")]
            print(f"| {name} ({size}) | {int(active[name].sum())} | {path} | {whole:.1f} | {spec:.1f} | "
                  f"{median[(name, 'loop', 'whole')] / whole:.2f}x | "
                  f"{median[(name, 'loop', 'specialists')] / spec:.2f}x |")
    if args.run_dir and args.train_steps:
        speed = {}
        for path in ("loop", "stacked", "loop", "stacked"):   # twice each, alternating; the better of two
            ensemble.stack = paths[path]
            speed[path] = max(speed.get(path, 0.0), train_images_per_s(cfg, dataset, ensemble, args.train_steps))
        print(f"\n| the run's student, {args.train_steps} steps of {cfg.student.train.batch_size}, "
              f"live ensemble teacher | training images/s | vs loop |\n|---|---:|---:|")
        for path, value in speed.items():
            print(f"| {path} | {value:.0f} | {value / speed['loop']:.2f}x |")


if __name__ == "__main__":
    main()
