"""The choices the combine stage makes on held-out data, and how well they hold on examples they were
not fitted on.

:func:`fit_choices` makes them all, in order, on the held-out split's outputs: the temperatures of the
models (``combine.calibrate``), the gate (``combine.gate``), the specialists' weights
(``combine.weighting``) and the temperature of the combination (``combine.calibrate_ensemble``).

The ensemble's held-out accuracy in the report is then scored on the very examples these were fitted
on: a gate picks its threshold among 20 and keeps or closes each specialist by its held-out gain, so
that number flatters the ensemble (hanzi-1k on its 65-epoch generalist: +0.24 points held-out, -0.02
test). ``combine.cross_fit: F`` (F >= 2) checks it on held-out data (:func:`cross_fit`): the held-out
split is cut into F folds, every choice is fitted again on F - 1 of them and scored on the one left
out, and the folds' scores are added up; beside it, the same folds scored with the choices fitted on
all held-out data (the report's held-out column). Each class's held-out examples are cut into F
consecutive runs in stored order (:func:`fold_ids`), so every fold holds every class; the glyph
sources store their held-out split font by font, so with as many folds as held-out fonts (hanzi: 3)
each fold is one font, the shift the test split's fonts bring: fitted on two fonts, scored on the third.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from combine.calibration import GRID, Calibration, best_temperature, fit_calibration, temperature_nll_sums
from combine.gating import Gate, fit_gate, fit_weights
from combine.kl import kl_combine
from combine.outputs import Chunk, SplitOutputs
from specdistill.config import CombineConfig
from specdistill.errors import SpecdistillError


def combine_chunk(chunk: Chunk, outputs: SplitOutputs, rule: CombineConfig, top_n: int, gate: Gate | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The KL combination of one chunk's rows with the generalist's top-n activation narrowed by ``gate``
    (and its weights): log q, the active set used, the rule's own active set, the solver's info."""
    gated = gate is not None and not gate.is_open
    rule_active = chunk.active(outputs.membership, top_n)
    active = gate.apply(rule_active, chunk.gen) if gated else rule_active
    log_q, info = kl_combine(chunk.gen, outputs.groups, chunk.specs, solver=rule.solver, max_iter=rule.max_iter,
                             tol=rule.tol, active=active, return_info=True, weights=gate.weights if gated else None)
    return log_q, active, rule_active, info


def fit_choices(val: SplitOutputs, rule: CombineConfig, progress: Callable[[str], None] = print
                ) -> tuple[Calibration, Gate]:
    """Every choice ``rule`` asks to fit, on the held-out outputs ``val`` (left with the calibration set)."""
    M = len(val.groups)
    calibration = calibrate(val, rule, progress) if rule.calibrate else Calibration.identity(M)
    val.calibration = calibration
    gate = fit_gate(rule.gate, val, rule, progress) if rule.gate != "none" else Gate.open(M)
    if rule.weighting == "fitted":   # per-specialist weights, within the gate
        gate = fit_weights(val, rule, gate, progress)
    if rule.calibrate_ensemble:   # last: the temperature of the combination as configured above
        calibration = replace(calibration, split="val")
        calibration.ensemble = fit_ensemble_temperature(val, rule, gate)
        progress(f"combine: temperature of the combined distribution on held-out data: {calibration.ensemble:.2f}")
        val.calibration = calibration
    return calibration, gate


def calibrate(val: SplitOutputs, rule: CombineConfig, progress: Callable[[str], None] = print) -> Calibration:
    """Temperatures on the held-out split's outputs."""
    calibration = fit_calibration(val, rule.top_n)
    taus = np.array(calibration.specialists) if calibration.specialists else np.ones(1)
    progress(f"combine: temperatures on held-out data: generalist {calibration.generalist:.2f}, specialists "
             f"median {np.median(taus):.2f} (range {taus.min():.2f}-{taus.max():.2f})")
    return calibration


def fit_ensemble_temperature(val: SplitOutputs, rule: CombineConfig, gate: Gate) -> float:
    """The temperature of the combined distribution (the configured top-n, gate and weights) with the least
    held-out NLL, from :data:`combine.calibration.GRID`; a chunk of rows at a time."""
    sums = torch.zeros(len(GRID), dtype=torch.float64)
    for chunk in val.chunks("temperature of the combination, held-out"):
        sums += temperature_nll_sums(combine_chunk(chunk, val, rule, rule.top_n, gate)[0], chunk.labels)
    return best_temperature(sums, len(val))


def fold_ids(labels: np.ndarray, folds: int) -> np.ndarray:
    """[N] each row's fold: every class's rows, in stored order, cut into ``folds`` consecutive runs of
    (nearly) equal size. A class with fewer rows than folds is missing from some folds."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sorted_labels = labels[order]
    rank = np.arange(len(labels)) - starts[sorted_labels]
    ids = np.empty(len(labels), dtype=np.int64)
    ids[order] = rank * folds // counts[sorted_labels]
    return ids


def _score(outputs: SplitOutputs, rule: CombineConfig, calibration: Calibration, gate: Gate | None) -> int:
    """Examples the combination of ``rule`` gets right with these choices (the temperature of the
    combination changes no prediction)."""
    outputs.calibration = calibration
    right = 0
    for chunk in outputs.chunks():
        right += int((combine_chunk(chunk, outputs, rule, rule.top_n, gate)[0].argmax(1) == chunk.labels).sum())
    return right


def cross_fit(val: SplitOutputs, rule: CombineConfig, folds: int, fitted: tuple[Calibration, Gate],
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The cross-fitted held-out check of the module docstring: per fold its examples, the generalist's
    correct ones, the ensemble's with the choices ``fitted`` on all held-out data, with the choices
    fitted on the other folds (and, with a gate, the ungated ensemble with that fold's calibration), and
    the gate fitted on the other folds (specialists kept, threshold)."""
    if folds < 2:
        raise SpecdistillError(f"combine.cross_fit={folds}: use 0 (off) or at least 2 folds")
    ids = fold_ids(val.labels.numpy(), folds)
    if np.bincount(ids, minlength=folds).min() == 0:
        raise SpecdistillError(f"combine.cross_fit={folds}: the held-out split's classes have fewer examples than "
                               "folds, so a fold is empty; use fewer folds")
    per_fold = []
    for i in range(folds):
        def fold_progress(line: str, i: int = i) -> None:
            progress(f"combine: cross-fit, fold {i + 1} of {folds} left out: {line.removeprefix('combine: ')}")

        calibration, gate = fit_choices(val.subset(np.flatnonzero(ids != i)), rule, fold_progress)
        part = val.subset(np.flatnonzero(ids == i))
        generalist = int((part.top1 == part.labels).sum())   # its stored top-1: no pass over the rows
        record = {"examples": len(part), "generalist": generalist,
                  "fitted_on_all": _score(part, rule, *fitted),
                  "fitted_on_others": _score(part, rule, calibration, gate)}
        if rule.gate != "none":
            record |= {"ungated_on_others": _score(part, rule, calibration, None),
                       "kept": int(sum(gate.keep)), "threshold": gate.threshold}
        per_fold.append(record)
        progress(f"combine: cross-fit, fold {i + 1} of {folds}: {len(part)} held-out examples, generalist "
                 f"{generalist / max(1, len(part)):.4f}, ensemble fitted on the other folds "
                 f"{record['fitted_on_others'] / max(1, len(part)):.4f} (fitted on all held-out data "
                 f"{record['fitted_on_all'] / max(1, len(part)):.4f})")
    totals = {key: sum(f[key] for f in per_fold) for key in per_fold[0] if key not in ("kept", "threshold")}
    return {"folds": folds, "per_fold": per_fold, "total": totals}
