"""The run directory as code: every path of the contract between stages, named once.

A stage never spells a path of the run directory; it asks :class:`RunDir`::

    run = RunDir.of(cfg)
    run.generalist_weights          # <run>/generalist/model.safetensors
    run.generalist_preds("val")     # <run>/generalist/preds-val.npy
    run.specialist_info(3)          # <run>/specialists/0003.json

The records stages hand each other (groups, a specialist's info, the combine result) are typed in
:mod:`specdistill.records`, each read and written there. docs/ARCHITECTURE.md shows the layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specdistill.config import Config

SPLITS = ("val", "test")   # held-out (every choice) and test (only the reported numbers)
METRICS = "metrics.jsonl"   # what engine.fit writes beside its checkpoint: one line per epoch


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of(cls, cfg: Config) -> RunDir:
        return cls(cfg.run_path)

    @classmethod
    def at(cls, path: str | os.PathLike) -> RunDir:
        return cls(Path(path))

    # ---- the run as a whole
    def stage(self, name: str) -> Path:
        return self.root / name

    def done(self, stage: str) -> Path:
        """``<stage>/done.json``: written last, names the config hash the stage finished with."""
        return self.root / stage / "done.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        """Held (flock) by the one process working in the run directory: ``specdistill.owner``."""
        return self.root / ".lock"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def training_curve(self) -> Path:   # the report's own pictures live at the run root
        return self.root / "generalist-training.png"

    @property
    def data_samples(self) -> Path:
        return self.root / "data-samples.png"

    # ---- stage 1: generalist
    @property
    def generalist(self) -> Path:
        return self.root / "generalist"

    def generalist_seed(self, seed: int) -> Path:
        """Folder of a further generalist trained from another seed (the student's ``generalists`` teacher)."""
        return self.root / f"generalist-seed{seed}"

    @staticmethod
    def weights_in(folder: Path) -> Path:
        """The weights of a generalist (or student) folder."""
        return folder / "model.safetensors"

    @staticmethod
    def preds_in(folder: Path, split: str) -> Path:
        """A generalist folder's stored log-probabilities on a split."""
        return folder / f"preds-{_split(split)}.npy"

    @staticmethod
    def topk_preds_in(folder: Path, split: str) -> Path:
        """The same predictions in top-k form (large K): each row's top log-probabilities, their class
        ids and the residual mass (``specdistill.predictions``); a folder holds one form or the other."""
        return folder / f"preds-{_split(split)}-topk.npz"

    @staticmethod
    def labels_in(folder: Path, split: str) -> Path:
        """A generalist folder's labels of a split, row for row with its predictions."""
        return folder / f"labels-{_split(split)}.npy"

    @staticmethod
    def meta_in(folder: Path) -> Path:
        """A generalist folder's meta.json: architecture, classes, input normalisation, metrics."""
        return folder / "meta.json"

    @staticmethod
    def class_examples_in(folder: Path) -> Path:
        """A generalist folder's one held-out image per class, for pictures."""
        return folder / "class-examples.npy"

    @property
    def generalist_weights(self) -> Path:
        return self.weights_in(self.generalist)

    @property
    def generalist_meta(self) -> Path:
        return self.meta_in(self.generalist)

    @property
    def generalist_metrics(self) -> Path:
        return self.generalist / METRICS

    def generalist_preds(self, split: str) -> Path:
        return self.preds_in(self.generalist, split)

    def generalist_labels(self, split: str) -> Path:
        return self.labels_in(self.generalist, split)

    @property
    def class_examples(self) -> Path:
        return self.class_examples_in(self.generalist)

    # ---- stage 2: clustering
    @property
    def clustering(self) -> Path:
        return self.root / "clustering"

    @property
    def clusters(self) -> Path:
        return self.clustering / "clusters.json"

    def clustering_figure(self, name: str) -> Path:
        return self.clustering / f"{name}.png"

    # ---- stage 3: specialists
    @property
    def specialists(self) -> Path:
        return self.root / "specialists"

    def specialist_weights(self, m: int) -> Path:
        return self.specialists / f"{m:04d}.safetensors"

    def specialist_info(self, m: int) -> Path:
        return self.specialists / f"{m:04d}.json"

    @property
    def specialists_work(self) -> Path:
        """Per-epoch checkpoints of specialists still training (removed when the stage finishes)."""
        return self.specialists / ".work"

    # ---- stage 4: combine
    @property
    def combine(self) -> Path:
        return self.root / "combine"

    @property
    def combine_eval(self) -> Path:
        return self.combine / "eval.json"

    @property
    def combine_report(self) -> Path:
        return self.combine / "report.md"

    def combine_preds(self, split: str) -> Path:
        return self.combine / f"preds-{_split(split)}.npy"

    def combine_topk_preds(self, split: str) -> Path:
        """The ensemble's predictions in top-k form, written instead of :meth:`combine_preds` when large."""
        return self.topk_preds_in(self.combine, split)

    @property
    def calibration(self) -> Path:
        return self.combine / "calibration.json"

    @property
    def gating(self) -> Path:
        return self.combine / "gating.json"

    @property
    def table4_figure(self) -> Path:
        return self.combine / "table4.png"

    # ---- stage 5: student
    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def student_weights(self) -> Path:
        return self.weights_in(self.student)

    @property
    def student_eval(self) -> Path:
        return self.student / "eval.json"

    @property
    def student_report(self) -> Path:
        return self.student / "report.md"

    @property
    def student_baselines(self) -> Path:
        return self.student / "baselines"

    def student_baseline(self, name: str) -> Path:
        return self.student_baselines / f"{name}.safetensors"

    @property
    def teacher_caches(self) -> Path:
        return self.student / "cache"

    def teacher_cache(self, kind: str) -> Path:
        return self.teacher_caches / kind

    def student_checkpoints(self, folder: str) -> Path:
        """One student's resumable checkpoints, in a folder keyed by everything that determines it."""
        return self.student / "runs" / folder

    # ---- export (specdistill export): a deployable bundle per exported model
    @property
    def export(self) -> Path:
        return self.root / "export"

    def export_bundle(self, model: str) -> Path:
        """``export/<model>/``: the ONNX graph of ``student`` or ``generalist`` and what serving it needs."""
        if model not in EXPORTABLE:
            raise ValueError(f"model must be one of {EXPORTABLE}, got {model!r}")
        return self.export / model

    def export_onnx(self, model: str) -> Path:
        return self.export_bundle(model) / "model.onnx"

    def export_preprocessing(self, model: str) -> Path:
        """How an image becomes the graph's input, what comes out, and the check against PyTorch."""
        return self.export_bundle(model) / "preprocessing.json"

    def export_classes(self, model: str) -> Path:
        """The class names, in the order of the graph's output logits."""
        return self.export_bundle(model) / "classes.json"


EXPORTABLE = ("student", "generalist")   # the models `specdistill export` writes


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split
