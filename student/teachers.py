"""Who teaches the student: the ensemble, the generalist alone, or an average of generalists.

A teacher here is a function from a batch of uint8 training images to log-probabilities over all
K classes (:data:`student.cache.TeacherFn`); the cache runs it once over the training split. Each
teacher also has a *description* - everything its targets depend on - which keys the cache.

* ``ensemble`` - the paper's system: the generalist plus every specialist, combined per example by
  ``combine.kl_combine`` (the same combiner, top-n and solver the combine stage evaluated).
* ``generalist`` - the generalist alone (the baseline that shows what the specialists add).
* ``generalists`` - the arithmetic mean of the distributions of several generalists trained from
  different seeds (the paper's "ensemble of models", section 4); seeds other than the run's own are
  trained here into ``<run>/generalist-seed<s>/`` with the generalist stage's own code.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from specdistill.artifacts import is_done, mark_done, require_done
from specdistill.config import Config, stage_hash
from specdistill.data import Dataset
from specdistill.engine import predict_logits
from specdistill.errors import SpecdistillError
from specdistill.models import load_classifier
from student.cache import TeacherFn

TEACHERS = ("ensemble", "generalist", "generalists")


def average_log_probs(log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of several distributions, in log space (no underflow for tiny probabilities)."""
    stacked = torch.stack([torch.as_tensor(lp, dtype=torch.float32) for lp in log_probs])
    return torch.logsumexp(stacked, dim=0) - math.log(len(log_probs))


def models_teacher(models: Sequence[nn.Module], device: torch.device, batch_size: int = 512) -> TeacherFn:
    """The mean distribution of ``models`` (one model: its own distribution)."""
    models = [m.to(device).eval() for m in models]

    def teacher(images: np.ndarray) -> torch.Tensor:
        return average_log_probs([torch.log_softmax(predict_logits(m, images, batch_size, device), dim=1)
                                  for m in models])

    return teacher


def check_class_count(teacher_classes: int, dataset: Dataset, what: str) -> None:
    if teacher_classes != dataset.num_classes:
        raise SpecdistillError(
            f"the {what} scores {teacher_classes} classes but the data has {dataset.num_classes}; "
            "use the data config of the run that trained it (or a new run directory)"
        )


# ----------------------------------------------------------------------------------------------
# generalist and generalists


def generalist_path(cfg: Config, seed: int) -> Path:
    run = cfg.run_path
    return run / ("generalist" if seed == cfg.seed else f"generalist-seed{seed}") / "model.safetensors"


def ensure_generalists(cfg: Config, dataset: Dataset, seeds: Sequence[int], progress: bool = True) -> list[Path]:
    """Weights of a generalist per seed, training the missing ones with ``generalist.train``.

    The run's own seed is the generalist stage's model; every other seed gets its own folder and
    ``done.json`` (hash of the generalist config with that seed), so a rerun skips finished ones
    and a killed one resumes from its checkpoint.
    """
    from generalist.train import train_generalist  # an earlier stage: allowed, imported lazily

    run = cfg.run_path
    require_done(run, "generalist", stage_hash(cfg, "generalist"))
    paths = []
    for seed in dict.fromkeys(seeds):
        path = generalist_path(cfg, seed)
        if seed != cfg.seed:
            folder = path.parent.name
            digest = stage_hash(cfg.model_copy(update={"seed": seed}), "generalist")
            if not is_done(run, folder, digest):
                if (path.parent / "done.json").exists():   # finished for another config: start over
                    shutil.rmtree(path.parent)
                train_generalist(cfg, path.parent, seed=seed, dataset=dataset, progress=progress)
                mark_done(run, folder, digest)
        paths.append(path)
    return paths


def generalists_teacher(paths: Sequence[Path], dataset: Dataset, device: torch.device,
                        batch_size: int = 512) -> TeacherFn:
    models = []
    for path in paths:
        model, meta = load_classifier(path, device)
        check_class_count(meta["num_classes"], dataset, f"generalist {path}")
        models.append(model)
    return models_teacher(models, device, batch_size)


# ----------------------------------------------------------------------------------------------
# the ensemble: generalist + specialists, combined per example


def ensemble_teacher(cfg: Config, dataset: Dataset, device: torch.device, batch_size: int = 512) -> TeacherFn:
    """Generalist + every specialist, combined per example with ``combine.kl_combine``."""
    from combine import active_specialists, kl_combine  # earlier stages: allowed, imported lazily
    from combine.calibration import apply_temperature, load_calibration
    from specialists.dustbin import specialist_log_probs
    from specialists.store import load_specialists

    run = cfg.run_path
    require_done(run, "combine", stage_hash(cfg, "combine"))
    generalist, meta = load_classifier(run / "generalist" / "model.safetensors", device)
    check_class_count(meta["num_classes"], dataset, "generalist")
    specialists = load_specialists(run, device)
    groups = [torch.as_tensor(info["classes"], dtype=torch.long, device=device) for _, info in specialists]
    corrections = [float(info.get("dustbin_correction", 0.0)) for _, info in specialists]
    # the combine stage's held-out temperatures, so the teacher is the ensemble combine evaluated
    calibration = (load_calibration(run, len(specialists)) if cfg.combine.calibrate
                   else {"generalist": 1.0, "specialists": [1.0] * len(specialists)})
    if any(int(g.max()) >= dataset.num_classes for g in groups if len(g)):
        raise SpecdistillError(f"a specialist in {run / 'specialists'} names a class id >= "
                               f"{dataset.num_classes}; rerun the specialists stage for this data")

    def teacher(images: np.ndarray) -> torch.Tensor:
        gen = torch.log_softmax(predict_logits(generalist, images, batch_size, device), dim=1).to(device)
        gen = apply_temperature(gen, calibration["generalist"])
        active = active_specialists(gen, groups, cfg.combine.top_n)
        spec = []
        for m, ((model, _), correction) in enumerate(zip(specialists, corrections)):
            # a specialist runs only on the examples where it is active; other rows are never read
            rows = torch.zeros(len(images), len(groups[m]) + 1, device=device)
            hit = active[:, m].cpu().numpy()
            if hit.any():
                rows[torch.as_tensor(hit, device=device)] = specialist_log_probs(
                    model, images[hit], correction, batch_size, device, calibration["specialists"][m]).to(device)
            spec.append(rows)
        return kl_combine(gen, groups, spec, top_n=cfg.combine.top_n, solver=cfg.combine.solver,
                          max_iter=cfg.combine.max_iter, tol=cfg.combine.tol, active=active).float().cpu()

    return teacher


# ----------------------------------------------------------------------------------------------


def describe_teacher(cfg: Config, kind: str, data_fingerprint: str) -> dict[str, Any]:
    """What a teacher's targets depend on (the cache key's input)."""
    if kind not in TEACHERS:
        raise SpecdistillError(f"unknown teacher {kind!r}; choose one of: {', '.join(TEACHERS)}")
    description: dict[str, Any] = {"teacher": kind, "data": data_fingerprint}
    if kind == "ensemble":
        description["combine"] = stage_hash(cfg, "combine")
    else:
        description["generalist"] = stage_hash(cfg, "generalist")
    if kind == "generalists":
        description["seeds"] = sorted(set(cfg.student.teacher_seeds))
    return description


def make_teacher(cfg: Config, kind: str, dataset: Dataset, device: torch.device,
                 progress: bool = True) -> TeacherFn:
    batch = cfg.student.train.eval_batch_size
    if kind == "ensemble":
        return ensemble_teacher(cfg, dataset, device, batch)
    if kind == "generalist":
        require_done(cfg.run_path, "generalist", stage_hash(cfg, "generalist"))
        return generalists_teacher([generalist_path(cfg, cfg.seed)], dataset, device, batch)
    if kind == "generalists":
        if len(set(cfg.student.teacher_seeds)) < 2:
            raise SpecdistillError("student.teacher=generalists averages several generalists; give at "
                                   "least two seeds in student.teacher_seeds, e.g. [0, 1]")
        paths = ensure_generalists(cfg, dataset, cfg.student.teacher_seeds, progress)
        return generalists_teacher(paths, dataset, device, batch)
    raise SpecdistillError(f"unknown teacher {kind!r}; choose one of: {', '.join(TEACHERS)}")
