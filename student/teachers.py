"""Who teaches the student: the ensemble, the generalist alone, or an average of generalists.

A teacher here is a function from a batch of uint8 training images to log-probabilities over all
K classes (:data:`student.cache.TeacherFn`); the cache runs it once over the training split. Each
teacher also has a *description* - everything its targets depend on - which keys the cache.

* ``ensemble`` - the paper's system: the generalist plus every specialist, combined per example by
  ``combine.kl_combine`` (the same combiner, top-n and solver the combine stage evaluated).
* ``generalist`` - the generalist alone (the baseline that shows what the specialists add).
* ``generalists`` - the arithmetic mean of the distributions of several generalists trained from
  different seeds (the paper's "ensemble of models", section 4); seeds other than the run's own are
  trained into ``<run>/generalist-seed<s>/`` with the generalist stage's own code (``generalist/rivals.py``).

With ``student.teacher_view: augmented`` the generalist or the ensemble is not cached but run as a module
(:func:`live_teacher`) on every augmented batch the student sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from generalist.rivals import ensure_generalists, generalist_dir
from specdistill.config import Config, stage_hash
from specdistill.data import Dataset
from specdistill.engine import predict_logits
from specdistill.errors import SpecdistillError
from specdistill.models import load_classifier
from specdistill.provenance import current_identity, require_done
from specdistill.rundir import RunDir
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


def generalists_teacher(folders: Sequence[Path], dataset: Dataset, device: torch.device,
                        batch_size: int = 512) -> TeacherFn:
    models = []
    for folder in folders:
        path = RunDir.weights_in(folder)
        model, meta = load_classifier(path, device)
        check_class_count(meta["num_classes"], dataset, f"generalist {path}")
        models.append(model)
    return models_teacher(models, device, batch_size)


# ----------------------------------------------------------------------------------------------
# the ensemble: generalist + specialists, combined per example


def ensemble_teacher(cfg: Config, dataset: Dataset, device: torch.device, batch_size: int = 512) -> TeacherFn:
    """Generalist + every specialist, combined per example: the ensemble the combine stage evaluated
    (the same :class:`combine.ensemble.Ensemble`, rule, held-out calibration and gate)."""
    ensemble = loaded_ensemble(cfg, dataset, device, batch_size)
    return lambda images: ensemble.log_probs(images, cfg.combine)


def loaded_ensemble(cfg: Config, dataset: Dataset, device: torch.device, batch_size: int = 512) -> Any:
    """The combine stage's :class:`combine.ensemble.Ensemble` with its held-out calibration and gate."""
    from combine.ensemble import Ensemble  # an earlier stage: allowed, imported lazily

    run = RunDir.of(cfg)
    require_done(run.root, "combine", stage_hash(cfg, "combine"))
    ensemble = Ensemble.load(run, device, batch_size)
    check_class_count(ensemble.num_classes, dataset, "generalist")
    ensemble.read_choices(run, cfg.combine)
    return ensemble


class LiveEnsemble(nn.Module):
    """The ensemble teacher as a module over normalised float batches [B, C, H, W]: the generalist, the
    specialists its top-n (and the held-out gate) activate, the KL combiner; log q [B, K] on the batch's
    device. The student's ``teacher_view: augmented`` runs it on every augmented batch.

    It counts the views it scores and the specialists that spoke for them (:meth:`consulted`): where the
    gate stays shut the ensemble is the generalist, so the share of views that consult a specialist says
    how much of what the specialists know can reach the student at all."""

    def __init__(self, ensemble: Any, rule: Any) -> None:
        super().__init__()
        self.ensemble, self.rule = ensemble, rule
        self.views = self.views_consulting = self.consultations = 0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        log_q, active = self.ensemble.log_probs_and_active(images, self.rule)
        self.views += len(images)
        self.views_consulting += int(active.any(1).sum())
        self.consultations += int(active.sum())
        return log_q.to(images.device)

    def consulted(self) -> dict[str, float]:
        """Of the views scored so far: the share that consulted any specialist, and specialists per view."""
        views = max(self.views, 1)
        return {"views": self.views, "share_consulting": self.views_consulting / views,
                "specialists_per_view": self.consultations / views}


class LogProbsOf(nn.Module):
    """A classifier's log-probabilities (the generalist as a live teacher)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model(images).float(), dim=1)


def live_teacher(cfg: Config, kind: str, dataset: Dataset, device: torch.device) -> nn.Module:
    """The teacher as a module run on the student's own augmented batches (``student.teacher_view``)."""
    run = RunDir.of(cfg)
    if kind == "generalist":
        model, meta = load_classifier(run.generalist_weights, device)
        check_class_count(meta["num_classes"], dataset, "generalist")
        return LogProbsOf(model.to(device).eval())
    if kind == "ensemble":
        return LiveEnsemble(loaded_ensemble(cfg, dataset, device, cfg.student.train.eval_batch_size), cfg.combine)
    raise SpecdistillError(f"student.teacher_view=augmented runs the generalist or the ensemble live, not the "
                           f"{kind} teacher; use student.teacher_view=cached for it")


# ----------------------------------------------------------------------------------------------


def describe_teacher(cfg: Config, kind: str, data_fingerprint: str) -> dict[str, Any]:
    """What a teacher's targets depend on (the cache key's input): the config that made its models
    and, by content, the models themselves (``specdistill.provenance``), so a generalist or
    specialist retrained under the same config never reuses targets computed from the old one."""
    if kind not in TEACHERS:
        raise SpecdistillError(f"unknown teacher {kind!r}; choose one of: {', '.join(TEACHERS)}")
    run = RunDir.of(cfg)
    description: dict[str, Any] = {"teacher": kind, "data": data_fingerprint,
                                   "generalist_identity": current_identity(run, "generalist")}
    if kind == "ensemble":
        description["combine"] = stage_hash(cfg, "combine")
        description["specialists_identity"] = current_identity(run, "specialists")
        description["combine_identity"] = current_identity(run, "combine")   # its calibration
    else:
        description["generalist"] = stage_hash(cfg, "generalist")
    if kind == "generalists":   # each seed's generalist by content (ensure_generalists has trained them)
        description["seeds"] = {str(seed): current_identity(run, generalist_dir(cfg, seed).name)
                                for seed in sorted(set(cfg.student.teacher_seeds))}
    return description


def make_teacher(cfg: Config, kind: str, dataset: Dataset, device: torch.device,
                 progress: bool = True) -> TeacherFn:
    batch = cfg.student.train.eval_batch_size
    if kind == "ensemble":
        return ensemble_teacher(cfg, dataset, device, batch)
    if kind == "generalist":
        require_done(cfg.run_path, "generalist", stage_hash(cfg, "generalist"))
        return generalists_teacher([generalist_dir(cfg, cfg.seed)], dataset, device, batch)
    if kind == "generalists":
        if len(set(cfg.student.teacher_seeds)) < 2:
            raise SpecdistillError("student.teacher=generalists averages several generalists; give at "
                                   "least two seeds in student.teacher_seeds, e.g. [0, 1]")
        folders = ensure_generalists(cfg, dataset, cfg.student.teacher_seeds, progress)
        return generalists_teacher(folders, dataset, device, batch)
    raise SpecdistillError(f"unknown teacher {kind!r}; choose one of: {', '.join(TEACHERS)}")
