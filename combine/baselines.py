"""Simple ways to combine the same outputs, reported beside the KL combiner.

A specialist speaks about |S_m| + 1 outcomes; to average or multiply it with the generalist it must
say something about each of the K classes. We spread its dustbin probability over the classes
outside its group *in proportion to the generalist's probabilities there*:

    p~_m(k) = p_m(k)                                  for k in S_m
    p~_m(k) = p_m(dustbin) * p_g(k) / p_g(not S_m)    otherwise.

* average: (p_g + sum over active m of p~_m) / (1 + |A|), the arithmetic mean of the available
  distributions. (It is also exactly one EM step of the KL combiner started from q = p_g.)
* product: the normalised geometric combination p_g * prod p~_m (a product of experts).

Both use the same active specialists as the KL combiner.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from combine.inputs import check_active, check_inputs, normalise_specialist


def expand_specialist(gen_rows: torch.Tensor, group: torch.Tensor, spec_rows: torch.Tensor,
                      covers_all: bool) -> torch.Tensor:
    """[n, K] float64 log p~_m for the given rows (see the module docstring)."""
    lg = torch.log_softmax(gen_rows.double(), dim=1)
    lp = normalise_specialist(spec_rows, covers_all)
    outside = torch.ones(lg.shape[1], dtype=torch.bool, device=lg.device)
    outside[group] = False
    log_out = lg.masked_fill(~outside, -torch.inf).logsumexp(dim=1, keepdim=True)
    spread = lp[:, -1:] + lg - log_out
    spread = torch.where(torch.isnan(spread), torch.full_like(spread, -torch.inf), spread)
    out = spread.masked_fill(~outside, -torch.inf)
    out[:, group] = lp[:, :-1]
    return out


def _combine(gen_log_probs, groups, spec_log_probs, active, how: str) -> torch.Tensor:
    inputs = check_inputs(gen_log_probs, groups, spec_log_probs)
    gen = inputs.gen_log_probs
    active = check_active(active, gen.shape[0], len(inputs.groups), gen.device)
    acc = torch.log_softmax(gen.double(), dim=1)
    for m, (group, spec) in enumerate(zip(inputs.groups, inputs.spec_log_probs)):
        rows = active[:, m].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        lp = expand_specialist(gen[rows], group, spec[rows], inputs.covers_all[m])
        acc[rows] = torch.logaddexp(acc[rows], lp) if how == "average" else acc[rows] + lp
    if how == "average":
        acc = acc - torch.log1p(active.sum(dim=1, keepdim=True).double())
    else:
        acc = torch.log_softmax(acc, dim=1)
    return acc.to(gen.dtype)


def average_of_distributions(gen_log_probs: torch.Tensor, groups: Sequence, spec_log_probs: Sequence,
                             active: torch.Tensor) -> torch.Tensor:
    """log of the mean of p_g and the active specialists' p~_m, [B, K]."""
    return _combine(gen_log_probs, groups, spec_log_probs, active, "average")


def product_of_experts(gen_log_probs: torch.Tensor, groups: Sequence, spec_log_probs: Sequence,
                       active: torch.Tensor) -> torch.Tensor:
    """log of the normalised product of p_g and the active specialists' p~_m, [B, K]."""
    return _combine(gen_log_probs, groups, spec_log_probs, active, "product")
