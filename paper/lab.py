"""The :class:`Lab` that trains, caches and evaluates every model of the paper experiments.

Rules the Lab enforces so that the tables can be trusted:

* every choice (alpha, T, bias, the epoch kept) is made on the held-out split; the test split is
  only predicted, after training, for the tables;
* a model is a pure function of its spec (architecture, training config, transfer set contents,
  teacher, loss, seed), so a run is deterministic for a seed; the spec's hash names the model in the
  work directory, so a second run (or another experiment needing the same model, e.g. the large
  net) loads it instead of training again;
* the teacher's logits are computed once per transfer set and looked up by example index, not run
  every batch (the students see no augmentation, so the targets are exactly a live teacher's).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from specdistill.config import Config, ModelConfig, TrainConfig
from specdistill.data import Dataset, Split
from specdistill.data.loading import ArrayDataset, BatchAugment, EpochBatchSampler, batch_loader
from specdistill.engine import fit, predict_logits, resolve_device
from specdistill.errors import SpecdistillError
from specdistill.hashing import digest_arrays, digest_json
from specdistill.kd import Distiller, build_loss
from specdistill.models import Classifier, build_model, load_classifier, save_classifier

SPEC_VERSION = 1            # bump when training changes in a way the spec does not show


class Regulariser(nn.Module):
    """The large net's regularisation besides hidden dropout (paper section 3): shifts of up to
    ``jitter_px`` pixels in any direction and dropout on the input pixels.

    Input dropout zeroes a pixel's *intensity* (it becomes background, -1 after ``to_float``) and
    scales the kept intensities by 1/(1-p), so the first layer sees the clean image in expectation.
    """

    def __init__(self, jitter_px: float, input_dropout: float, image_size: int) -> None:
        super().__init__()
        self.jitter = None
        if jitter_px > 0:  # a pure (sub-pixel) translation: BatchAugment with everything else off
            self.jitter = BatchAugment(degrees=0.0, scale=(1.0, 1.0), shear=0.0, translate=jitter_px / image_size,
                                       contrast=(1.0, 1.0), noise=0.0)
        self.input_dropout = input_dropout

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.jitter is not None:
            x = self.jitter(x, generator)
        if self.input_dropout > 0:
            keep = (torch.rand(x.shape, generator=generator) >= self.input_dropout).to(x.device)
            x = (x + 1) * keep / (1 - self.input_dropout) - 1
        return x


class RepeatedSampler(EpochBatchSampler):
    """An epoch of ``repeats`` shuffled passes over a small set, so the held-out check that ends
    each epoch (and early stopping) comes at a useful spacing rather than after every few steps."""

    def __init__(self, num_examples: int, repeats: int, batch_size: int, seed: int = 0) -> None:
        total = num_examples * repeats
        super().__init__(total, batch_size, seed, shuffle=True, drop_last=total > batch_size)
        self.base = num_examples

    def order(self) -> np.ndarray:
        return super().order() % self.base


class _CachedTargets:
    """Teacher logits of a transfer set, looked up by the batch's example indices."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def lookup(self, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.logits[index]   # every class is kept: exact at any temperature


@dataclass
class Run:
    """A trained model with its held-out and test predictions: all an experiment compares."""

    name: str
    key: str
    model: Classifier
    val_logits: torch.Tensor
    test_logits: torch.Tensor
    val_errors: int
    test_errors: int
    val_loss: float
    info: dict[str, Any] = field(default_factory=dict)   # best_epoch, epochs_run, val_acc per epoch, seconds


def count_errors(logits: torch.Tensor, labels: np.ndarray) -> int:
    return int((logits.argmax(1) != torch.as_tensor(labels)).sum())


def choose(candidates: dict[Any, Run]) -> Any:
    """The candidate with the fewest held-out errors (ties: the lower held-out loss, then the first)."""
    return min(candidates, key=lambda c: (candidates[c].val_errors, candidates[c].val_loss))


def mlp(hidden: list[int], dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(name="mlp", hidden=list(hidden), dropout=dropout)


def describe(model: ModelConfig) -> str:
    """'2x800' for the paper's equal-width MLPs, else the model's name and size."""
    if model.name != "mlp":
        return f"{model.name} depth {model.depth} width {model.width}"
    h = model.hidden
    return f"{len(h)}x{h[0]}" if h and len(set(h)) == 1 else "-".join(map(str, h))


class Lab:
    """Trains, caches and evaluates the models of the experiments (see the module docstring)."""

    def __init__(self, cfg: Config, dataset: Dataset, work_dir: str | Path | None = None,
                 device: str | torch.device | None = None, progress: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        if cfg.paper is None:
            raise SpecdistillError("the config has no 'paper' section; use configs/paper-fmnist.yaml "
                                   "or add a paper: section (see specdistill.config.PaperConfig)")
        if cfg.student.loss.name != "hinton":
            raise SpecdistillError(f"student.loss.name={cfg.student.loss.name!r}: the paper experiments "
                                   "distil with the paper's loss; set student.loss.name=hinton")
        self.cfg, self.data, self.paper = cfg, dataset, cfg.paper
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.device = resolve_device(cfg.device) if device is None else torch.device(device)
        self.progress = progress
        self.log = log or (lambda message: None)
        self.trained = self.loaded = 0
        self.train_seconds = 0.0
        self._runs: dict[str, Run] = {}
        self._targets: dict[tuple[str, str], torch.Tensor] = {}
        self._fingerprints: dict[int, tuple[np.ndarray, str]] = {}
        self.memo: dict[str, Any] = {}   # selections shared between experiments (e.g. the chosen alpha)

    # ------------------------------------------------------------------------------------------
    # What the experiments train

    def large_net(self) -> Run:
        """The cumbersome model: the generalist section's net on all training data, regularised."""
        g = self.cfg.generalist
        return self.train("large net", g.model, self.data.train, g.train, regularise=True)

    def fingerprint(self, array: np.ndarray) -> str:
        """Content hash of an array (memoised per array object, which is kept alive here)."""
        hit = self._fingerprints.get(id(array))
        if hit is None or hit[0] is not array:
            hit = self._fingerprints[id(array)] = (array, digest_arrays(array))
        return hit[1]

    def soft_targets(self, teacher: Run, images: np.ndarray) -> torch.Tensor:
        """The teacher's logits for a transfer set, computed once."""
        key = (teacher.key, self.fingerprint(images))
        if key not in self._targets:
            self._targets[key] = predict_logits(teacher.model, images, device=self.device)
        return self._targets[key]

    def train(self, name: str, model_cfg: ModelConfig, split: Split, train_cfg: TrainConfig, *,
              teacher: Run | None = None, temperature: float | None = None, alpha: float | None = None,
              regularise: bool = False, repeats: int = 1) -> Run:
        """Train (or load) one model; with ``teacher``, distil with the paper's loss at T and alpha.

        Early stopping: the epoch with the best held-out accuracy is kept (the engine's rule).
        """
        if teacher is not None and (temperature is None or alpha is None):
            raise ValueError("distilling needs both temperature and alpha")
        spec = {
            "version": SPEC_VERSION, "seed": self.cfg.seed, "model": model_cfg.model_dump(mode="json"),
            "train": train_cfg.model_dump(mode="json", exclude={"num_threads", "eval_batch_size"}),
            "images": self.fingerprint(split.images), "labels": self.fingerprint(split.labels),
            "val": self.fingerprint(self.data.val.images) + self.fingerprint(self.data.val.labels),
            "teacher": teacher.key if teacher is not None else None,
            "temperature": temperature if teacher is not None else None,
            "alpha": alpha if teacher is not None else None,
            "regularise": [self.paper.jitter_px, self.paper.input_dropout] if regularise else None,
            "repeats": repeats,
        }
        key = digest_json(spec)
        if key in self._runs:
            return self._runs[key]
        path = self.work_dir / f"{key}.safetensors" if self.work_dir is not None else None
        if path is not None and path.exists():
            model, meta = load_classifier(path, self.device)
            info = meta["info"]
            self.loaded += 1
            how = "loaded"
        else:
            model, info = self._fit(name, model_cfg, split, train_cfg, teacher, temperature, alpha,
                                    regularise, repeats)
            if path is not None:
                save_classifier(path, model, {"model": model_cfg.model_dump(mode="json"),
                                              "num_classes": self.data.num_classes, "channels": self.data.channels,
                                              "image_size": self.data.image_size, "name": name, "spec": spec,
                                              "info": info})
            how = f"trained in {info['train_seconds']:.0f}s"
        run = self._evaluate(name, key, model, info)
        self.log(f"{name}: held-out errors {run.val_errors}/{len(self.data.val)}, test errors "
                 f"{run.test_errors}/{len(self.data.test)} ({how}, kept epoch {info['best_epoch']}/"
                 f"{info['epochs_run']})")
        self._runs[key] = run
        return run

    def _fit(self, name, model_cfg, split, train_cfg, teacher, temperature, alpha, regularise,
             repeats) -> tuple[Classifier, dict]:
        torch.manual_seed(self.cfg.seed)      # same initial weights for every model of one architecture
        model = build_model(model_cfg, self.data.num_classes, self.data.channels, self.data.image_size)
        sampler = RepeatedSampler(len(split), repeats, train_cfg.batch_size, self.cfg.seed)
        loader = batch_loader(ArrayDataset(split), sampler)
        objective = None
        if teacher is not None:
            targets = _CachedTargets(self.soft_targets(teacher, split.images))
            loss = build_loss("hinton", temperature=temperature, alpha=alpha)
            objective = Distiller(model, loss, targets).objective
        augment = Regulariser(self.paper.jitter_px, self.paper.input_dropout, self.data.image_size) \
            if regularise else None
        start = time.perf_counter()
        metrics = fit(model, loader, self.data.val, train_cfg, None, objective, seed=self.cfg.seed, desc=name,
                      device=self.device, augment=augment, progress=self.progress)
        seconds = time.perf_counter() - start
        self.trained += 1
        self.train_seconds += seconds
        info = {"best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"],
                "val_acc": [round(r["val_acc"], 5) for r in metrics["history"]], "train_seconds": seconds}
        return model.eval(), info

    def _evaluate(self, name: str, key: str, model: Classifier, info: dict) -> Run:
        val_logits = predict_logits(model, self.data.val.images, device=self.device)
        test_logits = predict_logits(model, self.data.test.images, device=self.device)
        val_loss = float(F.cross_entropy(val_logits, torch.as_tensor(self.data.val.labels)))
        return Run(name, key, model, val_logits, test_logits, count_errors(val_logits, self.data.val.labels),
                   count_errors(test_logits, self.data.test.labels), val_loss, info)


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    """One experiment's outcome: markdown tables for people, ``data`` (JSON-able) for tests and files."""

    name: str
    title: str
    tables: list[str]
    notes: list[str]
    data: dict[str, Any]

    def markdown(self) -> str:
        parts = [f"### {self.title}", *self.tables]
        if self.notes:
            parts.append("\n".join(f"- {note}" for note in self.notes))
        return "\n\n".join(parts) + "\n"


def summary(run: Run) -> dict[str, Any]:
    return {"val_errors": run.val_errors, "test_errors": run.test_errors, "best_epoch": run.info["best_epoch"],
            "epochs_run": run.info["epochs_run"]}
