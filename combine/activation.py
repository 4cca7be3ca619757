"""Which specialists speak for an example: the paper's top-n rule (section 5.4, steps 1 and 2).

A specialist is *active* for an example when its class group contains any of the generalist's
``top_n`` most probable classes. Everything is a boolean mask over (example, specialist), built from
one ``[K, M]`` class-membership table, so no step loops over examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def membership_matrix(groups: Sequence[torch.Tensor], num_classes: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """``[K, M]`` bool: ``member[k, m]`` is True when class k is in specialist m's group."""
    device = device if device is not None else (groups[0].device if len(groups) else "cpu")
    member = torch.zeros(num_classes, len(groups), dtype=torch.bool, device=device)
    if len(groups):
        sizes = torch.tensor([len(g) for g in groups], device=device)
        spec = torch.repeat_interleave(torch.arange(len(groups), device=device), sizes)
        member[torch.cat([g.to(device) for g in groups]), spec] = True
    return member


def top_classes(gen_log_probs: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, n] values, [B, n] class ids) of each row's n largest entries (one pass for n = 1)."""
    if top_n == 1:
        values, index = gen_log_probs.max(dim=1)
        return values[:, None], index[:, None]
    top = gen_log_probs.topk(min(top_n, gen_log_probs.shape[1]), dim=1)
    return top.values, top.indices


def active_specialists(gen_log_probs: torch.Tensor, groups: Sequence[torch.Tensor], top_n: int = 1,
                       membership: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, M]`` bool: specialist m is active for example b when its group meets b's top-n classes.

    With ``top_n = 1`` (the paper's choice) an example activates exactly the specialists whose group
    holds the generalist's best guess, possibly none. Ties are broken by ``torch.max`` / ``torch.topk``.
    """
    if membership is None:
        membership = membership_matrix(groups, gen_log_probs.shape[1], gen_log_probs.device)
    return membership[top_classes(gen_log_probs, top_n)[1]].any(dim=1)


def coverage(labels: torch.Tensor, groups: Sequence[torch.Tensor], num_classes: int) -> torch.Tensor:
    """How many specialists' groups contain each example's true class (the rows of paper Table 4)."""
    member = membership_matrix(groups, num_classes, labels.device)
    return member[labels].sum(dim=1)
