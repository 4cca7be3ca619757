"""The dustbin correction: undo the prior shift that half/half training batches put into a specialist.

A specialist sees batches in which a share ``f`` (``specialists.specialist_fraction``) comes from its
group, while in the natural training distribution the group has the share ``pi``. A classifier
trained by cross-entropy learns the posterior under the *training* prior, so (Bayes' rule) every
group logit carries an extra ``log(f / pi)`` and the dustbin logit an extra
``log((1 - f) / (1 - pi))``. A softmax does not change when the same constant is added to every
logit, so the whole correction can be put on the dustbin logit alone:

    dustbin_correction = log(f / pi) - log((1 - f) / (1 - pi))
                       = log( [f / (1 - f)] / [pi / (1 - pi)] ),

the log of the factor by which the group is oversampled relative to everything else (paper
section 5.2: "incrementing the logit of the dustbin class by the log of the proportion by which the
specialist class is oversampled"). With f = 1/2 and a group of 1% of the data the factor is 99:
the specialist, trained to think the group is as common as everything else, is told that it is 99
times rarer than that. Using only the dustbin's own ratio ``(1 - pi) / (1 - f)`` (1.98 here) would
leave the group's oversampling uncorrected; ``tests/test_specialists.py`` checks both directions
against Bayes' rule on a hand case.

The correction is stored in ``specialists/<m>.json`` and in the weights file's metadata, and every
consumer (combine, student) goes through :func:`specialist_log_probs`, so it is applied in one place.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from specdistill.engine import predict_logits
from specdistill.errors import SpecdistillError


def group_share(labels: np.ndarray, classes: np.ndarray | list[int]) -> float:
    """The share of examples whose label is in the group: the group's natural prior ``pi``."""
    labels = np.asarray(labels)
    if labels.size == 0:
        raise SpecdistillError("no training labels to measure the group's share; check the data source")
    return float(np.isin(labels, np.asarray(classes)).mean())


def oversampling_factor(specialist_fraction: float, natural_share: float) -> float:
    """How much more often training batches show the group, relative to the dustbin, than nature does."""
    f, pi = float(specialist_fraction), float(natural_share)
    if not 0.0 < f < 1.0:
        raise SpecdistillError(f"specialist_fraction={f} must lie strictly between 0 and 1; "
                               "set specialists.specialist_fraction to e.g. 0.5")
    if not 0.0 < pi < 1.0:
        raise SpecdistillError(
            f"the group's share of the training data is {pi}; a specialist needs examples both inside "
            "and outside its group (rerun clustering, or check data.limit)"
        )
    return (f / (1.0 - f)) / (pi / (1.0 - pi))


def dustbin_correction(specialist_fraction: float, natural_share: float) -> float:
    """``log(oversampling factor)``: what to add to the dustbin logit after training."""
    return math.log(oversampling_factor(specialist_fraction, natural_share))


def confusion_correction(confusion_share: float, confusion_rate: float) -> float:
    """What to take off the dustbin logit, beyond :func:`dustbin_correction`, when ``confusion_share``
    of the dustbin examples were drawn from the generalist's confusions into the group
    (``specialists.confusion_fraction``) and the rest at random from the other classes.

    ``confusion_rate`` is ``r = P(top-n hits the group | label outside it)`` on the training split.
    Where the specialist is consulted (the generalist's top-n hits the group), an example outside the
    group is a confusion, so its density among the dustbin examples is ``c / r + (1 - c)`` times its
    natural one: a constant there, undone by ``log(1 + c (1 / r - 1))`` (0 for ``c = 0``). Elsewhere
    the specialist is not consulted, so the constant need not hold there.
    """
    c, r = float(confusion_share), float(confusion_rate)
    if c == 0.0:
        return 0.0
    if not 0.0 < r <= 1.0:
        raise SpecdistillError(f"confusion rate {r} must lie in (0, 1] when confusions are sampled")
    return math.log1p(c * (1.0 / r - 1.0))


def corrected_log_probs(logits: torch.Tensor, correction: float, temperature: float = 1.0) -> torch.Tensor:
    """Log-softmax of specialist logits with ``correction`` added to the dustbin (the last) logit,
    divided by ``temperature`` (a held-out calibration, ``combine.calibration``; 1 = none)."""
    logits = logits.float().clone()
    logits[:, -1] += float(correction)
    return torch.log_softmax(logits / float(temperature), dim=1)


@torch.no_grad()
def specialist_log_probs(model: nn.Module, images: np.ndarray | torch.Tensor, correction: float,
                         batch_size: int = 512, device: torch.device | str | None = None,
                         temperature: float = 1.0) -> torch.Tensor:
    """A specialist's corrected log-probabilities ``[B, |group| + 1]`` (dustbin last), on the CPU.

    ``images`` are uint8 (``[B,H,W]`` / ``[B,H,W,C]``, numpy or tensor) or an already normalised float
    batch ``[B,C,H,W]`` (e.g. the student's augmented batch), run in batches on ``device``. This is the
    one place the dustbin correction (and a calibration temperature) is applied; combine and student
    call it rather than the model directly.
    """
    return corrected_log_probs(predict_logits(model, images, batch_size, device), correction, temperature)
