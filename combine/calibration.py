"""Temperature calibration of the generalist and each specialist on held-out data, before combining.

The KL combiner weighs every active specialist as much as the generalist, so how sharp each model's
distribution is decides how much it counts. Temperature scaling (Guo et al. 2017) fits one number per
model, ``log_softmax(log p / tau)``, minimising the negative log-likelihood on the held-out split:
for a specialist, on the held-out examples where it would be active, with the labels folded onto
its group and dustbin. It changes no argmax of a single model, only how much each model counts.
Measured on hanzi-1k (BENCHMARKS.md): the specialists are overconfident (median tau 1.3-1.4), the
generalist slightly underconfident (0.77-0.85); calibrating narrowed the ensemble's loss against the
generalist but did not turn it into a gain, so it is off by default.

``combine.calibrate=true`` fits the temperatures in the combine stage, writes
``combine/calibration.json`` and applies them there and in the student's ensemble teacher.
``combine.calibrate_ensemble=true`` adds one more, ``ensemble``, on the combined distribution: fitted
last, on the held-out split, by the same NLL grid (:func:`fit_temperature`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from specdistill.artifacts import read_json, write_json
from specdistill.errors import SpecdistillError

if TYPE_CHECKING:
    from combine.outputs import SplitOutputs

# temperatures tried: 0.25 ... 8, log-spaced; the NLL is smooth in tau, a fine grid is exact enough
GRID = torch.logspace(np.log10(0.25), np.log10(8.0), 97)


@dataclass
class Calibration:
    """One temperature per model (1.0 = as trained) and one on their combination (``ensemble``), fitted
    on ``split`` (always the held-out one)."""

    generalist: float
    specialists: list[float]
    split: str = "val"
    ensemble: float = 1.0

    @classmethod
    def identity(cls, num_specialists: int) -> Calibration:
        return cls(1.0, [1.0] * num_specialists, "none")

    def write(self, path: str | os.PathLike) -> None:
        write_json(path, asdict(self))

    @classmethod
    def read(cls, path: str | os.PathLike, num_specialists: int) -> Calibration:
        """``combine/calibration.json``, checked against the number of specialists it is applied to."""
        raw: Any = read_json(path)
        found = raw.get("specialists") if isinstance(raw, dict) else None
        if not isinstance(found, list) or len(found) != num_specialists:
            count = len(found) if isinstance(found, list) else 0
            raise SpecdistillError(f"{path} holds {count} specialist temperatures for {num_specialists} "
                                   "specialists; rerun the combine stage (specdistill run CONFIG --from combine)")
        return cls(float(raw.get("generalist", 1.0)), [float(t) for t in found], str(raw.get("split", "val")),
                   float(raw.get("ensemble", 1.0)))


def temperature_nll_sums(log_probs: torch.Tensor, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[len(GRID)] the summed NLL of ``log_softmax(log_probs / tau)`` for every tau of GRID (add chunks up)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    lp = torch.as_tensor(log_probs, dtype=torch.float32).cpu()
    if len(labels) == 0:
        return torch.zeros(len(GRID), dtype=torch.float64)
    return torch.stack([torch.nn.functional.nll_loss(torch.log_softmax(lp / tau, dim=1), labels, reduction="sum")
                        for tau in GRID]).double()


def best_temperature(nll_sums: torch.Tensor, count: int) -> float:
    """The tau of GRID with the least NLL; 1.0 with no examples."""
    return float(GRID[int(torch.argmin(nll_sums))]) if count else 1.0


def fit_temperature(log_probs: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
    """The tau in GRID minimising the mean NLL of ``log_softmax(log_probs / tau)``; 1.0 with no examples."""
    return best_temperature(temperature_nll_sums(log_probs, labels), len(labels))


def apply_temperature(log_probs: torch.Tensor, tau: float) -> torch.Tensor:
    return log_probs if tau == 1.0 else torch.log_softmax(log_probs / tau, dim=1)


def fit_calibration(outputs: SplitOutputs, top_n: int) -> Calibration:
    """Temperatures on the held-out split's outputs (:class:`combine.outputs.SplitOutputs`): the
    generalist on every example (a chunk of rows at a time), each specialist on the examples where it
    would be active, with the labels folded onto its group and dustbin."""
    from specialists.sampler import fold_labels

    before, outputs.calibration = outputs.calibration, Calibration.identity(len(outputs.groups))
    try:
        sums = torch.zeros(len(GRID), dtype=torch.float64)
        for c in outputs.chunks("calibration, held-out"):
            sums += temperature_nll_sums(c.gen, c.labels)
        active = outputs.active(top_n)
        labels = outputs.labels.numpy()
        taus = []
        for m, group in enumerate(outputs.groups):
            rows = active[:, m].nonzero().squeeze(1)
            taus.append(fit_temperature(outputs.specialist_rows(m, rows), fold_labels(labels[rows.numpy()],
                                                                                      group.numpy()))
                        if len(rows) else 1.0)
        return Calibration(best_temperature(sums, len(outputs)), taus, "val")
    finally:
        outputs.calibration = before
