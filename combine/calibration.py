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

from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdistill.artifacts import read_json
from specdistill.errors import SpecdistillError

# temperatures tried: 0.25 ... 8, log-spaced; the NLL is smooth in tau, a fine grid is exact enough
GRID = torch.logspace(np.log10(0.25), np.log10(8.0), 97)
FILE = "calibration.json"


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


def load_calibration(run: Path, num_specialists: int) -> dict[str, Any]:
    """``combine/calibration.json``, checked against the number of specialists it is applied to."""
    cal = read_json(Path(run) / "combine" / FILE)
    if len(cal.get("specialists", [])) != num_specialists:
        raise SpecdistillError(f"{Path(run) / 'combine' / FILE} holds {len(cal.get('specialists', []))} "
                               f"specialist temperatures for {num_specialists} specialists; rerun the combine "
                               "stage (specdistill run CONFIG --from combine)")
    return cal
