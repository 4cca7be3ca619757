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

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specdistill.artifacts import is_done, mark_done, read_json, require_done, write_json, write_text
from specdistill.cli import config_from_args, prepare_run_dir, setup_environment, stage_parser
from specdistill.config import Config, ModelConfig, StudentLossConfig, stage_hash
from specdistill.data import Dataset, load_data
from specdistill.data.loading import BatchAugment, train_loader
from specdistill.engine import evaluate, fit, resolve_device
from specdistill.errors import SpecdistillError, exit_on_error
from specdistill.kd import Distiller, loss_from_config
from specdistill.models import Classifier, build_model, count_flops, save_classifier
from student.cache import TeacherCache, build_cache, cache_key, data_fingerprint, load_or_build, tempered_tail_share
from student.report import evaluation, render_report
from student.teachers import describe_teacher, make_teacher, models_teacher


@dataclass(frozen=True)
class StudentPlan:
    """One student to train: its architecture, loss and teacher (None = hard labels)."""

    name: str
    title: str
    model: ModelConfig
    loss: StudentLossConfig
    teacher: str | None


BASELINES = ("hard", "from-generalist", "from-ensemble")


def plan_students(cfg: Config) -> list[StudentPlan]:
    """The main student, the assistant before it when configured, and the baselines (deduplicated)."""
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
    plans.append(StudentPlan("student", title, s.model, hard if s.loss.name == "hard" else s.loss, main_teacher))
    wanted = s.baselines if isinstance(s.baselines, list) else BASELINES if s.baselines else []
    for name, title, loss, teacher in (("hard", "hard labels only", hard, None),
                                       ("from-generalist", "distilled from the generalist", distil, "generalist"),
                                       ("from-ensemble", "distilled from the ensemble", distil, "ensemble")):
        if name in wanted:
            same_as_main = (teacher == main_teacher and (teacher is None or loss == s.loss))
            if not same_as_main:
                plans.append(StudentPlan(name, title, s.model, loss, teacher))
    return plans


def train_one(cfg: Config, plan: StudentPlan, dataset: Dataset, teacher: TeacherCache | None,
              out_dir: Path, device: torch.device, progress: bool = True) -> tuple[Classifier, dict]:
    """Train one student with ``engine.fit``; resumes a checkpoint in ``out_dir``."""
    loss = loss_from_config(plan.loss)
    if teacher is not None and teacher.num_classes != dataset.num_classes:
        raise SpecdistillError(
            f"the teacher targets score {teacher.num_classes} classes but the student is built for "
            f"{dataset.num_classes}; delete {cfg.run_path / 'student' / 'cache'} and rerun the student stage"
        )
    torch.manual_seed(cfg.seed)
    model = build_model(plan.model, dataset.num_classes, dataset.channels, dataset.image_size)
    distiller = Distiller(model, loss, teacher if getattr(loss, "needs_teacher", True) else None)
    train = cfg.student.train
    result = fit(model, train_loader(dataset.train, train.batch_size, cfg.seed), dataset.val, train, out_dir,
                 objective=distiller.objective, seed=cfg.seed, desc=plan.name, device=device,
                 augment=BatchAugment() if cfg.data.augment else None, progress=progress,
                 fingerprint=f"{plan}:{teacher.key if teacher else 'labels'}")
    return model, result


def _run_folder(plan: StudentPlan, teacher_key: str, cfg: Config) -> str:
    """Checkpoint folder name: a different student config never resumes another one's checkpoint."""
    blob = json.dumps([plan.model.model_dump(), plan.loss.model_dump(), cfg.student.train.model_dump(),
                       teacher_key, cfg.seed], sort_keys=True, default=str)
    return f"{plan.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def model_meta(model: Classifier, plan: StudentPlan, dataset: Dataset, **extra: Any) -> dict[str, Any]:
    return {"class_names": dataset.class_names, "num_classes": dataset.num_classes,
            "channels": dataset.channels, "image_size": dataset.image_size,
            "model": plan.model.model_dump(mode="json"), "teacher": plan.teacher,
            "loss": plan.loss.model_dump(mode="json"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "macs": count_flops(model.cpu(), dataset.channels, dataset.image_size), **extra}


def run_student(cfg: Config, force: bool = False, progress: bool = True,
                dataset: Dataset | None = None) -> dict[str, Any]:
    """The pipeline's stage 5: skipped when it already finished with the same config hash."""
    run = prepare_run_dir(cfg)
    out = run / "student"
    digest = stage_hash(cfg, "student")
    if not force and is_done(run, "student", digest):
        result = read_json(out / "eval.json")
        print(f"student: already trained in {out} (config hash {digest}); test accuracy "
              f"{result['test_acc']:.4f}. Use --force to retrain.")
        return result
    if force:
        shutil.rmtree(out, ignore_errors=True)
    elif (out / "done.json").exists():
        # finished for another config: keep the keyed teacher caches and student runs (a student whose
        # model, loss, schedule and teacher did not change is reused, not retrained)
        for name in ("baselines", "done.json"):
            target = out / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    require_done(run, "generalist", stage_hash(cfg, "generalist"))
    started = time.perf_counter()
    dataset = dataset or load_data(cfg.data, cfg.seed)
    device = resolve_device(cfg.device)
    fingerprint = data_fingerprint(dataset.train.images, dataset.train.labels)
    plans = plan_students(cfg)

    caches: dict[str, TeacherCache] = {}
    cache_seconds: dict[str, float] = {}

    def teacher_cache(kind: str) -> TeacherCache:
        if kind not in caches:
            began = time.perf_counter()
            caches[kind] = load_or_build(
                out / "cache" / kind, describe_teacher(cfg, kind, fingerprint),
                lambda: make_teacher(cfg, kind, dataset, device, progress), dataset.train.images,
                cfg.student.cache_top_k, cfg.student.train.eval_batch_size, progress, f"{kind} teacher")
            cache_seconds[kind] = time.perf_counter() - began
            temperature = cfg.student.loss.temperature
            tail = tempered_tail_share(caches[kind], temperature)
            if tail > 0.5 and cfg.student.loss.name != "hard":
                print(f"student: warning: at T={temperature:g}, {tail:.0%} of the {kind} teacher's soft targets "
                      f"lie outside its top {caches[kind].top_k} classes (kept as an even share), so the soft "
                      "term mostly teaches a flat tail; try a lower student.loss.temperature", flush=True)
        return caches[kind]

    students: dict[str, dict[str, Any]] = {}
    main_model: Classifier | None = None
    for plan in plans:
        if plan.teacher is None:
            teacher = None
        elif plan.teacher == "assistant":      # built right after the assistant trained (plans order)
            teacher = caches["assistant"]
        else:
            teacher = teacher_cache(plan.teacher)
        key = teacher.key if teacher is not None else "labels"
        model, result = train_one(cfg, plan, dataset, teacher, out / "runs" / _run_folder(plan, key, cfg),
                                  device, progress)
        val = evaluate(model, dataset.val, cfg.student.train.eval_batch_size, device)
        test = evaluate(model, dataset.test, cfg.student.train.eval_batch_size, device)
        metrics = {"val_acc": val["acc"], "test_acc": test["acc"], "test_loss": test["loss"],
                   "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
                   "train_seconds": result["train_seconds"], "images_per_s": result["images_per_s"]}
        meta = model_meta(model, plan, dataset, metrics=metrics, teacher_key=key)
        students[plan.name] = {"title": plan.title, **{k: meta[k] for k in ("model", "teacher", "loss",
                                                                          "parameters", "macs")}, **metrics}
        if plan.name == "student":
            main_model = model
            save_classifier(out / "model.safetensors", model, meta)
        else:
            save_classifier(out / "baselines" / f"{plan.name}.safetensors", model, meta)
        if plan.name == "assistant":   # the assistant teaches the student: cache its targets too
            model.to(device)
            description = {"teacher": "assistant", "of": key, "run": _run_folder(plan, key, cfg),
                           "top_k": cfg.student.cache_top_k}
            began = time.perf_counter()
            caches["assistant"] = build_cache(models_teacher([model], device, cfg.student.train.eval_batch_size),
                                              dataset.train.images, cfg.student.cache_top_k,
                                              cache_key(description), description,
                                              cfg.student.train.eval_batch_size, progress, "assistant teacher")
            caches["assistant"].save(out / "cache" / "assistant")
            cache_seconds["assistant"] = time.perf_counter() - began
        print(f"student: {plan.title}: val accuracy {val['acc']:.4f}, test accuracy {test['acc']:.4f}")
    assert main_model is not None

    result = evaluation(cfg, dataset, students, caches, cache_seconds, device)
    result["seconds"] = time.perf_counter() - started
    write_json(out / "eval.json", result)
    write_text(out / "report.md", render_report(result))
    mark_done(run, "student", digest, test_acc=result["test_acc"])
    gain = result["gain_kept"].get("student")
    print(f"student: test accuracy {result['test_acc']:.4f}"
          + (f", keeps {gain:.0%} of the ensemble's gain over the generalist" if gain is not None and gain >= 0
             else ", below the generalist" if gain is not None else "")
          + f" -> {out}")
    return result


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    setup_environment()
    args = stage_parser("Stage 5: distil the ensemble into one student.").parse_args(argv)
    run_student(config_from_args(args), force=args.force)


if __name__ == "__main__":
    main()
