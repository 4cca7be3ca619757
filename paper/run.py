"""The paper experiments by name, in the order the report shows them, and the runner.

One explicit table rather than registration by import: reading this file tells every experiment
there is, and importing it imports them all.
"""

from __future__ import annotations

from collections.abc import Callable

from paper import experiments, transfer
from paper.lab import Lab, Result
from specdistill.errors import SpecdistillError

EXPERIMENTS: dict[str, Callable[[Lab], Result]] = {
    "gap": experiments.gap,
    "temperature": experiments.temperature,
    "missing-class": experiments.missing_class,
    "small-data": transfer.small_data,
    "synthetic-transfer": transfer.synthetic_transfer,
}
EXPERIMENT_ORDER = tuple(EXPERIMENTS)


def run_experiments(lab: Lab, names: list[str] | tuple[str, ...] = EXPERIMENT_ORDER) -> list[Result]:
    """Run the named experiments in order; models shared between them are trained once."""
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown:
        raise SpecdistillError(f"unknown paper experiment {unknown[0]!r}; choose one of: {', '.join(EXPERIMENT_ORDER)}")
    return [EXPERIMENTS[name](lab) for name in names]
