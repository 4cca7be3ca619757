"""The student stage's evaluation (``eval.json``) and its markdown report.

The headline number is the share of the ensemble's gain over the generalist that a student keeps,
``(acc_student - acc_generalist) / (acc_ensemble - acc_generalist)`` on the test split (the paper,
speech section: one distilled model kept more than 80% of a 10-model ensemble's gain). It is only
defined when the ensemble beat the generalist; a student smaller than the generalist can keep a
negative share, and the report says so rather than hiding it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import binomtest

from generalist.rivals import generalist_dir, mean_accuracy
from specdistill.artifacts import read_json
from specdistill.config import Config
from specdistill.data import Dataset
from specdistill.errors import SpecdistillError
from specdistill.formatting import md_table, percent
from specdistill.predictions import StoredPredictions
from specdistill.records import CombineResult
from specdistill.rundir import SPLITS, RunDir
from student.cache import TeacherCache, tempered_tail_share


def teacher_accuracies(cfg: Config, dataset: Dataset, kinds: set[str]) -> dict[str, dict[str, Any]]:
    """What the earlier stages measured for each teacher on the held-out and test splits; nothing is rebuilt.

    The generalist's from its meta.json, the ensemble's from combine/eval.json (absent when the
    combine stage has not run), the average of several generalists' from their stored predictions.
    """
    run = RunDir.of(cfg)
    metrics = read_json(run.generalist_meta)["metrics"]
    teachers: dict[str, dict[str, Any]] = {
        "generalist": {"val_acc": float(metrics["val_acc"]), "test_acc": float(metrics["test_acc"])}}
    if run.combine_eval.exists():
        combined = CombineResult.read(run.combine_eval)
        teachers["ensemble"] = {split + "_acc": combined.ensemble_acc(split) for split in combined.splits}
        teachers["ensemble"]["source"] = "combine/eval.json"
    if "generalists" in kinds:
        seeds = sorted(set(cfg.student.teacher_seeds))
        folders = [generalist_dir(cfg, s) for s in seeds]
        teachers["generalists"] = {"seeds": seeds}
        for split in SPLITS:
            teachers["generalists"][f"{split}_acc"] = mean_accuracy(folders, split, dataset.split(split).labels)
    return teachers


def gain_kept(acc: float, generalist: float, ensemble: float | None) -> float | None:
    if ensemble is None or ensemble <= generalist:
        return None
    return (acc - generalist) / (ensemble - generalist)


def paired(student: np.ndarray, rival: np.ndarray) -> dict[str, Any]:
    """The student against a rival on the same examples (bool arrays: right or not): how many only the
    student gets right, how many only the rival, and the two-sided sign test's p-value on those (the
    examples both get right or both miss say nothing about which is better)."""
    only_student, only_rival = int((student & ~rival).sum()), int((~student & rival).sum())
    p = float(binomtest(only_student, only_student + only_rival).pvalue) if only_student + only_rival else 1.0
    return {"only_student": only_student, "only_rival": only_rival, "p_value": p}


def paired_comparisons(cfg: Config, dataset: Dataset, hits: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """The main student against each other student of the stage and the generalist (its stored
    predictions), on the held-out and the test examples: ``{rival: {split: paired(...)}}``."""
    run = RunDir.of(cfg)
    rivals = {name: h for name, h in hits.items() if name != "student"}
    generalist: dict[str, np.ndarray] = {}
    for split in ("val", "test"):
        store = StoredPredictions.open(run.generalist, split)
        labels = dataset.split(split).labels
        if store.num_examples != len(labels):
            raise SpecdistillError(f"the generalist's stored {split} predictions ({store.path}) have "
                                   f"{store.num_examples} rows but the {split} split {len(labels)}; they were "
                                   "made with other data: rerun the generalist stage (specdistill run CONFIG "
                                   "--from generalist)")
        generalist[split] = np.concatenate([block.argmax(1) == labels[rows] for rows, block in store.blocks()])
    rivals["generalist"] = generalist
    return {name: {split: paired(hits["student"][split], h[split]) for split in ("val", "test")}
            for name, h in rivals.items()}


def evaluation(cfg: Config, dataset: Dataset, students: dict[str, dict[str, Any]],
               caches: dict[str, TeacherCache], cache_seconds: dict[str, float]) -> dict[str, Any]:
    teachers = teacher_accuracies(cfg, dataset, set(caches))
    generalist = teachers["generalist"]["test_acc"]
    ensemble = teachers.get("ensemble", {}).get("test_acc")
    cache_info = {
        kind: {"top_k": cache.top_k, "num_examples": len(cache), "key": cache.key,
               "megabytes": round((cache.log_probs.numel() * 2 + cache.indices.numel() * 4
                                   + cache.residual.numel() * 4) / 2**20, 2),
               "mean_residual_mass": float(cache.residual.mean()) if len(cache) else 0.0,
               "tail_share_at_temperature": tempered_tail_share(cache, cfg.student.loss.temperature),
               "seconds": round(cache_seconds.get(kind, 0.0), 2)}
        for kind, cache in caches.items()}
    return {
        "test_acc": students["student"]["test_acc"],
        "students": students,
        "teachers": teachers,
        "gain_kept": {name: gain_kept(s["test_acc"], generalist, ensemble) for name, s in students.items()},
        "ensemble_gain": None if ensemble is None else ensemble - generalist,
        "cache": cache_info,
        "config": cfg.student.model_dump(mode="json"),
        "augmentation": ("the teacher (generalist or ensemble) run on every augmented batch the student sees "
                         f"(student.teacher_view=augmented, data.augment={cfg.data.augment})"
                         if cfg.student.teacher_view == "augmented" else
                         "teacher targets computed once on un-augmented training images and reused for "
                         f"every augmented view (data.augment={cfg.data.augment})")
                        + (f"; every training batch mixed up in pairs (student.mixup={cfg.student.mixup:g}: "
                           + ("the teacher scores the mixed images" if cfg.student.teacher_view == "augmented"
                              else "the cached targets mixed like the labels") + ")"
                           if cfg.student.mixup > 0 else ""),
    }


def render_report(result: dict[str, Any]) -> str:
    lines = ["# Student: one model distilled from the teachers", ""]
    temperature = result["config"]["loss"]["temperature"]
    teachers = result["teachers"]
    rows = [[f"**{name}** (teacher)", "", "", "", "", "", percent(t.get("val_acc")), percent(t["test_acc"]), ""]
            for name, t in teachers.items()]
    for name, s in result["students"].items():
        loss = s["loss"]["name"] + ("" if s["loss"]["name"] == "hard" else
                                    f" T={s['loss']['temperature']:g} alpha={s['loss']['alpha']:g}")
        rows.append([s["title"], s["teacher"] or "labels", loss, s.get("init", "scratch"), f"{s['parameters']:,}",
                     f"{s['macs']:,}",
                     percent(s["val_acc"]), percent(s["test_acc"]), percent(result["gain_kept"][name])])
    lines.append(md_table(["system", "teacher", "loss", "starts from", "parameters", "MACs", "val acc", "test acc",
                           "gain kept"], rows, align="llllrrrrr"))
    lines.append("")
    if result["ensemble_gain"] is None:
        lines.append("The ensemble's accuracy is not available (combine/eval.json), so no share of its gain "
                     "can be computed.")
    elif result["ensemble_gain"] <= 0:
        lines.append(f"The ensemble did not beat the generalist on this run ({percent(result['ensemble_gain'])} "
                     "points), so there is no gain for a student to keep.")
    else:
        kept = result["gain_kept"]["student"]
        lines.append(f"The ensemble beats the generalist by {100 * result['ensemble_gain']:.2f} points; the "
                     f"student keeps {percent(kept)} of that gain (the paper's speech model kept more than 80% "
                     "of a 10-model ensemble's gain). A negative share means the student is below the "
                     "generalist, e.g. because it is smaller.")
    if result.get("paired"):
        titles = {**{name: s["title"] for name, s in result["students"].items()}, "generalist": "the generalist"}
        lines += ["", "On the same examples, the student against each rival: how many only one of the two gets "
                  "right, and the sign test's p-value on those (a small p: the difference is unlikely to be "
                  "chance).", "", md_table(
                      ["rival", "held-out: only the student", "only the rival", "p", "test: only the student",
                       "only the rival", "p"],
                      [[titles.get(name, name), *(v for split in ("val", "test") for v in (
                          c[split]["only_student"], c[split]["only_rival"], f"{c[split]['p_value']:.3f}"))]
                       for name, c in result["paired"].items()], align="lrrrrrr")]
    for s in result["students"].values():
        if s.get("teacher_consulted"):
            c = s["teacher_consulted"]
            lines += ["", f"{s['title']}: the ensemble consulted a specialist on {percent(c['share_consulting'])} "
                      f"of the {c['views']:,} training views it scored ({c['specialists_per_view']:.2f} specialists "
                      "per view); on the others it is the generalist, so only these views can teach the student "
                      "what the specialists add."]
    if result["cache"]:   # none when every teacher ran live on the student's batches
        lines += ["", "## Teacher cache", "", md_table(
            ["teacher", "top-k", "examples", "MB", "mean residual mass",
             f"tempered mass outside the top k (T={temperature:g})", "seconds to build"],
            [[kind, c["top_k"], f"{c['num_examples']:,}", c["megabytes"], f"{c['mean_residual_mass']:.2e}",
              percent(c.get("tail_share_at_temperature")), c["seconds"]] for kind, c in result["cache"].items()],
            align="lrrrrrr")]
    if any((c.get("tail_share_at_temperature") or 0) > 0.5 for c in result["cache"].values()):
        lines += ["", f"At T={temperature:g} most of the soft targets' mass lies on the classes outside the "
                  "teacher's top k, which the cache stores as an even share: the soft term mostly teaches a "
                  "flat tail. A lower temperature (chosen on held-out data) usually distils better here."]
    lines += ["", f"Augmentation: {result['augmentation']}. See `student/cache.py` for what this assumes.", ""]
    return "\n".join(lines)
