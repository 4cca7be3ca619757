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
import torch

from specdistill.artifacts import read_json, read_npy
from specdistill.config import Config
from specdistill.data import Dataset
from student.cache import TeacherCache, tempered_tail_share


def generalist_test_acc(cfg: Config) -> float:
    folder = cfg.run_path / "generalist"
    preds, labels = read_npy(folder / "preds-test.npy"), read_npy(folder / "labels-test.npy")
    return float((preds.argmax(1) == labels).mean())


def ensemble_test_acc(cfg: Config) -> float | None:
    """The generalist + specialists accuracy the combine stage measured (paper table 3).

    Read from ``combine/eval.json``; the preferred layout is ``{"ensemble": {"test_acc": ...}}``,
    a few other obvious layouts are accepted so the two stages need not change in lock step.
    """
    path = cfg.run_path / "combine" / "eval.json"
    if not path.exists():
        return None
    result = read_json(path)
    for keys in (("ensemble", "test_acc"), ("systems", "ensemble", "acc"), ("table3", "ensemble_acc"),
                 ("ensemble_test_acc",), ("test_acc",)):
        node: Any = result
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (int, float)):
            return float(node)
    return None


def _teacher_acc_on_test(cfg: Config, kind: str, dataset: Dataset, device: torch.device) -> float:
    from student.teachers import make_teacher

    teacher = make_teacher(cfg, kind, dataset, device, progress=False)
    batch = cfg.student.train.eval_batch_size
    preds = np.concatenate([teacher(dataset.test.images[i:i + batch]).argmax(1).numpy()
                            for i in range(0, len(dataset.test), batch)])
    return float((preds == dataset.test.labels).mean())


def gain_kept(acc: float, generalist: float, ensemble: float | None) -> float | None:
    if ensemble is None or ensemble <= generalist:
        return None
    return (acc - generalist) / (ensemble - generalist)


def evaluation(cfg: Config, dataset: Dataset, students: dict[str, dict[str, Any]],
               caches: dict[str, TeacherCache], cache_seconds: dict[str, float],
               device: torch.device) -> dict[str, Any]:
    generalist = generalist_test_acc(cfg)
    ensemble = ensemble_test_acc(cfg)
    teachers: dict[str, Any] = {"generalist": {"test_acc": generalist}}
    if ensemble is not None:
        teachers["ensemble"] = {"test_acc": ensemble, "source": "combine/eval.json"}
    elif "ensemble" in caches:   # combine's report lacks the number: measure it the same way here
        ensemble = _teacher_acc_on_test(cfg, "ensemble", dataset, device)
        teachers["ensemble"] = {"test_acc": ensemble, "source": "student stage (kl_combine on the test split)"}
    if "generalists" in caches:
        teachers["generalists"] = {"test_acc": _teacher_acc_on_test(cfg, "generalists", dataset, device),
                                   "seeds": sorted(set(cfg.student.teacher_seeds))}
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
        "augmentation": "teacher targets computed once on un-augmented training images and reused for "
                        f"every augmented view (data.augment={cfg.data.augment})",
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def render_report(result: dict[str, Any]) -> str:
    lines = ["# Student: one model distilled from the teachers", ""]
    temperature = result["config"]["loss"]["temperature"]
    teachers = result["teachers"]
    lines += ["| system | teacher | loss | parameters | MACs | val acc | test acc | gain kept |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, t in teachers.items():
        lines.append(f"| **{name}** (teacher) | | | | | | {_pct(t['test_acc'])} | |")
    for name, s in result["students"].items():
        loss = s["loss"]["name"] + ("" if s["loss"]["name"] == "hard" else
                                    f" T={s['loss']['temperature']:g} alpha={s['loss']['alpha']:g}")
        lines.append(f"| {s['title']} | {s['teacher'] or 'labels'} | {loss} | {s['parameters']:,} | "
                     f"{s['macs']:,} | {_pct(s['val_acc'])} | {_pct(s['test_acc'])} | "
                     f"{_pct(result['gain_kept'][name])} |")
    lines.append("")
    if result["ensemble_gain"] is None:
        lines.append("The ensemble's accuracy is not available (combine/eval.json), so no share of its gain "
                     "can be computed.")
    elif result["ensemble_gain"] <= 0:
        lines.append(f"The ensemble did not beat the generalist on this run ({_pct(result['ensemble_gain'])} "
                     "points), so there is no gain for a student to keep.")
    else:
        kept = result["gain_kept"]["student"]
        lines.append(f"The ensemble beats the generalist by {100 * result['ensemble_gain']:.2f} points; the "
                     f"student keeps {_pct(kept)} of that gain (the paper's speech model kept more than 80% "
                     "of a 10-model ensemble's gain). A negative share means the student is below the "
                     "generalist, e.g. because it is smaller.")
    lines += ["", "## Teacher cache", "",
              f"| teacher | top-k | examples | MB | mean residual mass | tempered mass outside the top k "
              f"(T={temperature:g}) | seconds to build |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, c in result["cache"].items():
        lines.append(f"| {kind} | {c['top_k']} | {c['num_examples']:,} | {c['megabytes']} | "
                     f"{c['mean_residual_mass']:.2e} | {_pct(c.get('tail_share_at_temperature'))} | {c['seconds']} |")
    if any((c.get("tail_share_at_temperature") or 0) > 0.5 for c in result["cache"].values()):
        lines += ["", f"At T={temperature:g} most of the soft targets' mass lies on the classes outside the "
                  "teacher's top k, which the cache stores as an even share: the soft term mostly teaches a "
                  "flat tail. A lower temperature (chosen on held-out data) usually distils better here."]
    lines += ["", f"Augmentation: {result['augmentation']}. See `student/cache.py` for what this assumes.", ""]
    return "\n".join(lines)
