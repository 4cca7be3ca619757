"""A specialist: the generalist's network with a head over its group's classes plus one dustbin.

Paper section 5.2 initialises each specialist with the generalist's weights. The new head copies the
generalist's rows for the group's classes, so before any training the specialist ranks the group's
classes exactly as the generalist does. The dustbin should carry the generalist's probability of
everything *outside* the group, i.e. its logit should be ``logsumexp`` of the outside logits: then
``softmax([group logits, dustbin])`` is exactly the generalist's distribution folded onto the group
(:func:`fold_logits`). A logsumexp of linear functions is not linear, so one linear row can only
approximate it. We fit that row on features of real examples:

* ``"lstsq"``: ridge least squares of ``w . f + b`` onto ``logsumexp(outside logits)``;
* ``"kl"``: start from ``"lstsq"``, then minimise the KL divergence between the generalist's folded
  distribution and the specialist's (L-BFGS over the dustbin row only; convex, because the row
  enters a softmax linearly). This targets the probabilities directly, where least squares weights
  every logit error alike, also those that a softmax ignores;
* ``"constant"``: weight 0 and the bias set to the mean outside logsumexp (the crude baseline).

``tests/test_specialists.py`` checks on held-out examples that the initial specialist's accuracy
within its group equals the generalist's and that its dustbin probability tracks the generalist's
outside mass; ``benchmarks/bench_specialists.py`` prints the three side by side.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from torch import nn

from specdistill.errors import SpecdistillError
from specdistill.models import Classifier

DustbinInit = Literal["lstsq", "kl", "constant"]


def as_class_index(classes: np.ndarray | list[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Validate a group's class ids (unique, in range, at least 2, not every class) as a long tensor."""
    index = torch.as_tensor(np.asarray(classes, dtype=np.int64))
    if index.dim() != 1:
        raise SpecdistillError(f"a group must be a flat list of class ids, got shape {tuple(index.shape)}")
    if len(index) < 2:
        raise SpecdistillError(
            f"a group of {len(index)} class(es) {index.tolist()} makes a useless specialist; "
            "rerun clustering with clustering.min_size >= 2"
        )
    if len(torch.unique(index)) != len(index):
        raise SpecdistillError(f"group {index.tolist()} names a class twice; rerun clustering")
    bad = index[(index < 0) | (index >= num_classes)]
    if len(bad):
        raise SpecdistillError(
            f"group names class id {int(bad[0])} but the generalist has {num_classes} classes "
            f"(0-{num_classes - 1}); rerun clustering on this generalist's predictions"
        )
    if len(index) >= num_classes:
        raise SpecdistillError(
            f"a group covers all {num_classes} classes, leaving nothing for the dustbin; "
            "use more, smaller groups (clustering.k / clustering.size)"
        )
    return index


def outside_mask(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    mask = torch.ones(num_classes, dtype=torch.bool)
    mask[classes] = False
    return mask


def fold_logits(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` logits -> ``[B, |S|+1]``: the group's logits, then logsumexp of all others.

    The softmax of the result is exactly the softmax of ``logits`` with every class outside the
    group summed into one dustbin; used for the initial fit and for the generalist's soft targets.
    """
    classes = classes.to(logits.device)
    mask = outside_mask(classes.cpu(), logits.shape[1]).to(logits.device)
    return torch.cat([logits[:, classes], torch.logsumexp(logits[:, mask], dim=1, keepdim=True)], dim=1)


@torch.no_grad()
def _fit_lstsq(features: torch.Tensor, target: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.double()
    y = target.double()
    mean_x, mean_y = x.mean(0), y.mean()
    xc = x - mean_x
    gram = xc.T @ xc
    lam = ridge * float(torch.trace(gram)) / gram.shape[0] + 1e-12
    weight = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ (y - mean_y))
    bias = mean_y - mean_x @ weight
    return weight.float(), bias.float()


def _refine_kl(features: torch.Tensor, group_logits: torch.Tensor, folded_target: torch.Tensor,
               weight: torch.Tensor, bias: torch.Tensor, steps: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.softmax(folded_target, dim=1)
    w = weight.clone().requires_grad_(True)
    b = bias.clone().reshape(1).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        dustbin = features @ w + b
        log_p = torch.log_softmax(torch.cat([group_logits, dustbin[:, None]], dim=1), dim=1)
        loss = -(target * log_p).sum(1).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()[0]


def make_specialist(generalist: Classifier, classes: np.ndarray | list[int] | torch.Tensor,
                    features: torch.Tensor, dustbin_init: DustbinInit = "kl",
                    ridge: float = 1e-3) -> Classifier:
    """A copy of ``generalist`` whose head scores ``classes`` (in that order) and then a dustbin.

    ``features`` ``[N, F]`` are backbone features of examples from the natural distribution (the
    training split, unaugmented), on which the dustbin row is fitted; the generalist is not changed.
    """
    num_classes = generalist.head.out_features
    index = as_class_index(classes, num_classes)
    if features.dim() != 2 or features.shape[1] != generalist.num_features or len(features) < 2:
        raise SpecdistillError(f"need [N>=2, {generalist.num_features}] features to fit the dustbin, "
                               f"got {tuple(features.shape)}")
    specialist = copy.deepcopy(generalist)
    old = generalist.head
    weight, bias = old.weight.detach().float().cpu(), old.bias.detach().float().cpu()
    features = features.detach().float().cpu()
    with torch.no_grad():
        logits = features @ weight.T + bias
        folded = fold_logits(logits, index)
        target = folded[:, -1]
        if dustbin_init == "constant":
            d_weight, d_bias = torch.zeros(weight.shape[1]), target.mean()
        elif dustbin_init in ("lstsq", "kl"):
            d_weight, d_bias = _fit_lstsq(features, target, ridge)
        else:
            raise SpecdistillError(f"unknown dustbin_init {dustbin_init!r}; choose lstsq, kl or constant")
    if dustbin_init == "kl":
        d_weight, d_bias = _refine_kl(features, folded[:, :-1], folded, d_weight, d_bias)
    head = nn.Linear(generalist.num_features, len(index) + 1)
    with torch.no_grad():
        head.weight[:-1] = weight[index]
        head.bias[:-1] = bias[index]
        head.weight[-1] = d_weight
        head.bias[-1] = d_bias
    specialist.head = head.to(old.weight.device)
    return specialist
