"""Stage 4: the KL combiner (paper section 5.4) and the ensemble's evaluation (paper tables 3 and 4).

``kl_combine`` is the public entry point for anyone serving the generalist + specialists from their
own model outputs; ``combine.ensemble.Ensemble`` is the generalist + specialists of a run directory
as one model (the combine stage evaluates it, the student stage distils it); the evaluation stage is
``python -m combine.evaluate`` (``run_combine`` for the pipeline).
"""

from combine.activation import active_specialists, coverage, membership_matrix, top_classes
from combine.kl import SOLVERS, kl_combine, kl_objective

__all__ = ["SOLVERS", "active_specialists", "coverage", "kl_combine", "kl_objective", "membership_matrix",
           "top_classes"]
