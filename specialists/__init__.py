"""Stage 3: specialists, each the generalist with a head over one group of classes plus a dustbin.

Public API (combine and student read specialists only through these):

* :func:`load_specialists` / :func:`load_specialist` - models and their JSON from a run directory;
* :func:`specialist_log_probs` - a specialist's log-probabilities with the dustbin correction applied;
* :func:`make_specialist`, :class:`SpecialistBatchSampler`, :func:`dustbin_correction`,
  :func:`train_one` - the pieces, for people who build their own loop;
* ``specialists.fanout.run_specialists(cfg)`` - the stage (Ray; imported lazily, Ray is heavy).
"""

from specialists.dustbin import (
    corrected_log_probs,
    dustbin_correction,
    group_share,
    oversampling_factor,
    specialist_log_probs,
)
from specialists.model import fold_logits, make_specialist
from specialists.sampler import SpecialistBatchSampler, fold_labels
from specialists.store import load_specialist, load_specialists
from specialists.train import train_one

__all__ = [
    "SpecialistBatchSampler", "corrected_log_probs", "dustbin_correction", "fold_labels", "fold_logits",
    "group_share", "load_specialist", "load_specialists", "make_specialist", "oversampling_factor",
    "specialist_log_probs", "train_one",
]
