"""Stage 5: distil the ensemble (or another teacher) into one deployable student.

    python -m student.train --config configs/quickstart.yaml [--set student.loss.temperature=8]

Trains ``student.model`` on the training split with ``student.loss`` (see ``specdistill.kd``)
against cached teacher targets (see ``student.cache``), plus, with ``student.baselines``, the same
student trained on hard labels alone, distilled from the generalist alone and distilled from the
ensemble; with ``student.assistant`` the chain teacher -> assistant -> student (Mirzadeh et al.
2019). Writes ``<run>/student/``: ``model.safetensors`` (the main student), ``baselines/*.safetensors``,
``eval.json``, ``report.md``, the teacher caches under ``cache/`` and per-student checkpoints under
``runs/``; ``done.json`` last.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specdistill.artifacts import read_json, write_json, write_text
from specdistill.cli import config_from_args, prepare_run_dir, setup_environment, stage_parser
from specdistill.config import NATURAL_SOURCES, TRAIN_RUNTIME_KEYS, Config, ModelConfig, StudentLossConfig, stage_hash
from specdistill.data import Dataset, load_data
from specdistill.data.loading import training_batches
from specdistill.engine import evaluate, fit, resolve_device
from specdistill.errors import SpecdistillError, exit_on_error
from specdistill.hashing import digest_json
from specdistill.kd import Distiller, loss_from_config
from specdistill.models import Classifier, build_model, count_flops, load_classifier, save_classifier, widen_from
from specdistill.provenance import is_done, mark_done, require_done
from specdistill.records import CombineResult
from specdistill.rundir import RunDir
from student.cache import TeacherCache, build_cache, cache_key, data_fingerprint, load_or_build, tempered_tail_share
from student.report import evaluation, paired_comparisons, render_report
from student.teachers import (
    LiveEnsemble,
    describe_teacher,
    ensure_generalists,
    live_teacher,
    make_teacher,
    models_teacher,
)


@dataclass(frozen=True)
class StudentPlan:
    """One student to train: its architecture, loss, teacher (None = hard labels) and where its weights
    start (``student.init``; left out of the repr, which keys checkpoints, so scratch runs keep theirs)."""

    name: str
    title: str
    model: ModelConfig
    loss: StudentLossConfig
    teacher: str | None
    init: str = field(default="scratch", repr=False)


BASELINES = ("hard", "from-generalist", "from-ensemble")


def plan_students(cfg: Config) -> list[StudentPlan]:
    """The main student, the assistant before it when configured, and the baselines (deduplicated); the
    assistant, another network, always starts from scratch."""
    s = cfg.student
    hard = StudentLossConfig(name="hard")   # the hard-label baseline does not depend on T or alpha
    distil = s.loss if s.loss.name != "hard" else s.loss.model_copy(update={"name": "hinton"})
    main_teacher = None if s.loss.name == "hard" else s.teacher
    plans: list[StudentPlan] = []
    if s.assistant is not None and main_teacher is not None:
        plans.append(StudentPlan("assistant", f"assistant ({main_teacher} -> assistant)", s.assistant,
                                 s.loss, main_teacher))
        main_teacher = "assistant"
    title = "student" + (f" ({s.teacher} -> assistant -> student)" if main_teacher == "assistant" else "")
    plans.append(StudentPlan("student", title, s.model, hard if s.loss.name == "hard" else s.loss, main_teacher,
                             s.init))
    wanted = s.baselines if isinstance(s.baselines, list) else BASELINES if s.baselines else []
    for name, title, loss, teacher in (("hard", "hard labels only", hard, None),
                                       ("from-generalist", "distilled from the generalist", distil, "generalist"),
                                       ("from-ensemble", "distilled from the ensemble", distil, "ensemble")):
        if name in wanted:
            same_as_main = (teacher == main_teacher and (teacher is None or loss == s.loss))
            if not same_as_main:
                plans.append(StudentPlan(name, title, s.model, loss, teacher, s.init))
    return plans


def train_one(cfg: Config, plan: StudentPlan, dataset: Dataset, teacher: TeacherCache | nn.Module | None,
              out_dir: Path, device: torch.device, progress: bool = True,
              teacher_key: str | None = None) -> tuple[Classifier, dict]:
    """Train one student with ``engine.fit``; resumes a checkpoint in ``out_dir``. ``teacher``: cached
    targets, or a module run live on every augmented batch (``student.teacher_view: augmented``)."""
    loss = loss_from_config(plan.loss)
    if isinstance(teacher, TeacherCache) and teacher.num_classes != dataset.num_classes:
        raise SpecdistillError(
            f"the teacher targets score {teacher.num_classes} classes but the student is built for "
            f"{dataset.num_classes}; delete {RunDir.of(cfg).teacher_caches} and rerun the student stage"
        )
    torch.manual_seed(cfg.seed)
    model = build_model(plan.model, dataset.num_classes, dataset.channels, dataset.image_size)
    if plan.init == "generalist":   # the config checks that student.model is the generalist's network or wider
        widen_from(model, load_classifier(RunDir.of(cfg).generalist_weights)[0].state_dict())
    distiller = Distiller(model, loss, teacher if getattr(loss, "needs_teacher", True) else None,
                          mixup=cfg.student.mixup)
    train = cfg.student.train
    loader, augment = training_batches(dataset.train, cfg.data, train.batch_size, cfg.seed, device=device)
    result = fit(model, loader, dataset.val, train, out_dir,
                 objective=distiller.objective, seed=cfg.seed, desc=plan.name, device=device,
                 augment=augment, progress=progress,
                 fingerprint=f"{plan}:{teacher_key or (teacher.key if teacher is not None else 'labels')}"
                             + ("" if plan.init == "scratch" else f":init={plan.init}"))
    return model, result


def _run_folder(plan: StudentPlan, teacher_key: str, cfg: Config, data_fingerprint: str) -> str:
    """Checkpoint folder name, keyed by everything that determines the student: its model, loss and
    schedule, its teacher's targets, the training images (by content) and how they are augmented;
    not where it trains (train.workers), so a checkpoint resumes on another worker count."""
    schedule = cfg.student.train.model_dump(exclude=set(TRAIN_RUNTIME_KEYS))
    augment = [cfg.data.augment] + ([list(cfg.data.crop_scale)] if cfg.data.source in NATURAL_SOURCES else [])
    key = digest_json([plan.model.model_dump(), plan.loss.model_dump(), schedule, teacher_key, cfg.seed,
                       data_fingerprint, *augment, *([plan.init] if plan.init != "scratch" else []),
                       *([f"mixup={cfg.student.mixup:g}"] if cfg.student.mixup > 0 else [])])
    return f"{plan.name}-{key}"


def model_meta(model: Classifier, plan: StudentPlan, dataset: Dataset, **extra: Any) -> dict[str, Any]:
    return {"class_names": dataset.class_names, "num_classes": dataset.num_classes,
            "channels": dataset.channels, "image_size": dataset.image_size,
            "model": plan.model.model_dump(mode="json"), "teacher": plan.teacher,
            "loss": plan.loss.model_dump(mode="json"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "macs": count_flops(model.cpu(), dataset.channels, dataset.image_size), **extra}


def run_student(cfg: Config, force: bool = False, progress: bool = True,
                dataset: Dataset | None = None) -> dict[str, Any]:
    """The pipeline's stage 5: skipped when it already finished with the same config hash.

    Steps: plan the students, train each (building the teacher caches it needs), record.
    """
    run = RunDir.at(prepare_run_dir(cfg, force))
    digest = stage_hash(cfg, "student")
    if not force and is_done(run.root, "student", digest):
        result = read_json(run.student_eval)
        print(f"student: already trained in {run.student} (config hash {digest}); test accuracy "
              f"{result['test_acc']:.4f}. Use --force to retrain.")
        return result
    clear_previous(run, force)
    require_done(run.root, "generalist", stage_hash(cfg, "generalist"))
    if run.combine_eval.exists():   # the report reads the ensemble's accuracy from it: check it first
        CombineResult.read(run.combine_eval)
    started = time.perf_counter()
    dataset = dataset or load_data(cfg.data, cfg.seed)
    teachers = TeacherCaches(cfg, run, dataset, resolve_device(cfg.device), progress)
    students = {plan.name: train_and_save(cfg, run, plan, dataset, teachers, progress)
                for plan in plan_students(cfg)}
    hits = {name: row.pop("hits") for name, row in students.items()}   # which examples each gets right
    result = evaluation(cfg, dataset, students, teachers.caches, teachers.seconds)
    result["paired"] = paired_comparisons(cfg, dataset, hits)
    result["seconds"] = time.perf_counter() - started
    write_json(run.student_eval, result)
    write_text(run.student_report, render_report(result))
    mark_done(run.root, "student", digest, test_acc=result["test_acc"])
    gain = result["gain_kept"].get("student")
    print(f"student: test accuracy {result['test_acc']:.4f}"
          + (f", keeps {gain:.0%} of the ensemble's gain over the generalist" if gain is not None and gain >= 0
             else ", below the generalist" if gain is not None else "")
          + f" -> {run.student}")
    return result


def clear_previous(run: RunDir, force: bool) -> None:
    """``--force`` starts over; a stage finished for another config keeps its keyed teacher caches and
    student checkpoints (a student whose model, loss, schedule and teacher did not change is reused)."""
    if force:
        shutil.rmtree(run.student, ignore_errors=True)
    elif run.done("student").exists():
        shutil.rmtree(run.student_baselines, ignore_errors=True)
        run.done("student").unlink(missing_ok=True)


class TeacherCaches:
    """Each teacher's targets over the training split, built once (keyed on disk) and reused."""

    def __init__(self, cfg: Config, run: RunDir, dataset: Dataset, device: torch.device, progress: bool) -> None:
        self.cfg, self.run, self.dataset, self.device, self.progress = cfg, run, dataset, device, progress
        self.fingerprint = data_fingerprint(dataset.train.images, dataset.train.labels)
        self.caches: dict[str, TeacherCache] = {}
        self.seconds: dict[str, float] = {}

    def get(self, kind: str) -> TeacherCache:
        """A named teacher's cache (``assistant`` must have been added by :meth:`add_assistant` first)."""
        if kind not in self.caches:
            cfg, dataset = self.cfg, self.dataset
            began = time.perf_counter()
            if kind == "generalists":   # trained first, so the cache key can name them by content
                ensure_generalists(cfg, dataset, cfg.student.teacher_seeds, self.progress)
            self.caches[kind] = load_or_build(
                self.run.teacher_cache(kind), describe_teacher(cfg, kind, self.fingerprint),
                lambda: make_teacher(cfg, kind, dataset, self.device, self.progress), dataset.train.images,
                cfg.student.cache_top_k, cfg.student.train.eval_batch_size, self.progress, f"{kind} teacher")
            self.seconds[kind] = time.perf_counter() - began
            self._warn_flat_tail(kind)
        return self.caches[kind]

    def live(self, kind: str) -> tuple[nn.Module, str]:
        """The teacher as a module for ``student.teacher_view: augmented`` (no cache), and its key: the
        cached teacher's description (the models by content) marked as seen through augmentation."""
        key = cache_key({**describe_teacher(self.cfg, kind, self.fingerprint), "view": "augmented"})
        return live_teacher(self.cfg, kind, self.dataset, self.device), key

    def add_assistant(self, model: Classifier, description: dict[str, Any]) -> None:
        """The trained assistant teaches the student: cache its targets too."""
        cfg = self.cfg
        began = time.perf_counter()
        cache = build_cache(models_teacher([model.to(self.device)], self.device, cfg.student.train.eval_batch_size),
                            self.dataset.train.images, cfg.student.cache_top_k, cache_key(description),
                            description, cfg.student.train.eval_batch_size, self.progress, "assistant teacher")
        cache.save(self.run.teacher_cache("assistant"))
        self.caches["assistant"] = cache
        self.seconds["assistant"] = time.perf_counter() - began

    def _warn_flat_tail(self, kind: str) -> None:
        temperature = self.cfg.student.loss.temperature
        tail = tempered_tail_share(self.caches[kind], temperature)
        if tail > 0.5 and self.cfg.student.loss.name != "hard":
            print(f"student: warning: at T={temperature:g}, {tail:.0%} of the {kind} teacher's soft targets "
                  f"lie outside its top {self.caches[kind].top_k} classes (kept as an even share), so the soft "
                  "term mostly teaches a flat tail; try a lower student.loss.temperature", flush=True)


def train_and_save(cfg: Config, run: RunDir, plan: StudentPlan, dataset: Dataset, teachers: TeacherCaches,
                   progress: bool) -> dict[str, Any]:
    """Train one planned student (resuming its checkpoint), evaluate it, save its weights; its eval row, with
    ``hits`` (which held-out and test examples it gets right) for the paired comparisons."""
    if plan.teacher is not None and plan.teacher != "assistant" and cfg.student.teacher_view == "augmented":
        teacher, key = teachers.live(plan.teacher)
    else:
        teacher = None if plan.teacher is None else teachers.get(plan.teacher)
        key = teacher.key if teacher is not None else "labels"
    folder = _run_folder(plan, key, cfg, teachers.fingerprint)
    model, result = train_one(cfg, plan, dataset, teacher, run.student_checkpoints(folder), teachers.device,
                              progress, teacher_key=key)
    val = evaluate(model, dataset.val, cfg.student.train.eval_batch_size, teachers.device, hits=True)
    test = evaluate(model, dataset.test, cfg.student.train.eval_batch_size, teachers.device, hits=True)
    metrics = {"val_acc": val["acc"], "test_acc": test["acc"], "test_loss": test["loss"],
               "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
               "train_seconds": result["train_seconds"], "images_per_s": result["images_per_s"]}
    if isinstance(teacher, LiveEnsemble) and teacher.views:   # 0 when a finished checkpoint was reloaded
        metrics["teacher_consulted"] = teacher.consulted()
    meta = model_meta(model, plan, dataset, metrics=metrics, teacher_key=key, init=plan.init)
    save_classifier(run.student_weights if plan.name == "student" else run.student_baseline(plan.name), model, meta)
    if plan.name == "assistant":
        teachers.add_assistant(model, {"teacher": "assistant", "of": key, "run": folder,
                                       "top_k": cfg.student.cache_top_k})
    print(f"student: {plan.title}: val accuracy {val['acc']:.4f}, test accuracy {test['acc']:.4f}")
    return {"title": plan.title, **{k: meta[k] for k in ("model", "teacher", "loss", "parameters", "macs", "init")},
            **metrics, "hits": {"val": val["hits"], "test": test["hits"]}}


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    setup_environment()
    args = stage_parser("Stage 5: distil the ensemble into one student.").parse_args(argv)
    run_student(config_from_args(args), force=args.force)


if __name__ == "__main__":
    main()
