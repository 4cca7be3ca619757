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
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from specdistill.artifacts import read_json, write_json
from specdistill.data import take
from specdistill.errors import SpecdistillError

if TYPE_CHECKING:
    from combine.ensemble import Ensemble

# temperatures tried: 0.25 ... 8, log-spaced; the NLL is smooth in tau, a fine grid is exact enough
GRID = torch.logspace(np.log10(0.25), np.log10(8.0), 97)


@dataclass
class Calibration:
    """One temperature per model (1.0 = as trained), fitted on ``split`` (always the held-out one)."""

    generalist: float
    specialists: list[float]
    split: str = "val"

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
        return cls(float(raw.get("generalist", 1.0)), [float(t) for t in found], str(raw.get("split", "val")))


def fit_temperature(log_probs: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
    """The tau in GRID minimising the mean NLL of ``log_softmax(log_probs / tau)``; 1.0 with no examples."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(labels) == 0:
        return 1.0
    lp = torch.as_tensor(log_probs, dtype=torch.float32).cpu()
    nll = torch.stack([torch.nn.functional.nll_loss(torch.log_softmax(lp / tau, dim=1), labels) for tau in GRID])
    return float(GRID[int(torch.argmin(nll))])


def apply_temperature(log_probs: torch.Tensor, tau: float) -> torch.Tensor:
    return log_probs if tau == 1.0 else torch.log_softmax(log_probs / tau, dim=1)


def fit_calibration(ensemble: Ensemble, val_gen_log_probs: torch.Tensor, val_images: np.ndarray,
                    val_labels: np.ndarray, top_n: int) -> Calibration:
    """Temperatures on the held-out split: the generalist on every example, each specialist on the
    examples where it would be active, with the labels folded onto its group and dustbin."""
    from specialists.sampler import fold_labels

    before, ensemble.calibration = ensemble.calibration, Calibration.identity(len(ensemble))
    try:
        active = ensemble.active(val_gen_log_probs, top_n)
        taus = []
        for m, group in enumerate(ensemble.groups):
            hit = active[:, m].numpy()
            taus.append(fit_temperature(ensemble.specialist_log_probs(m, take(val_images, hit)),
                                        fold_labels(val_labels[hit], group.numpy())) if hit.any() else 1.0)
        return Calibration(fit_temperature(val_gen_log_probs, val_labels), taus, "val")
    finally:
        ensemble.calibration = before
