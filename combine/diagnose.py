"""Table 4 taken apart: which examples the specialists broke or fixed, and which specialist did it.

For every example whose top-1 the ensemble changed, against the generalist alone:

* *broken*: the generalist was right and the ensemble is wrong; *fixed*: the reverse;
* the *cause*: the active specialist that moved the true class's probability the most in that
  direction, compared on the specialist's own terms: its probability for the bucket holding the true
  class (the class itself when it is in its group, else its dustbin) against the generalist's
  probability for the same bucket (the generalist folded onto the group + dustbin);
* the cause's *kind*: the true class is a ``core`` member of that specialist's group (found by
  k-means), a member the ``overlap`` step added (clustering.size), or outside the group, so the
  specialist spoke through its ``dustbin``.

A rising Table 4 needs fixes to outnumber breaks in every row; where breaks by ``dustbin`` dominate,
specialists that do not know the true class are voting it down; where ``overlap`` dominates, the
look-alikes added to fill groups are the weak members.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KINDS = ("core", "overlap", "dustbin")


def _folded_generalist(gen_log_probs: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """The generalist's [B, |S|+1] log-probabilities on a specialist's terms: its classes, then the rest."""
    inside = gen_log_probs[:, group]
    outside = torch.log1p(-inside.exp().sum(dim=1).clamp(max=1 - 1e-12))
    return torch.cat([inside, outside[:, None]], dim=1)


def change_causes(gen_log_probs: torch.Tensor, combined_log_probs: torch.Tensor, labels: torch.Tensor,
                  groups: Sequence[torch.Tensor], spec_log_probs: Sequence[torch.Tensor], active: torch.Tensor,
                  num_core: Sequence[int] | None = None) -> torch.Tensor:
    """[B] for each example whose top-1 the ensemble changed, the kind (index into :data:`KINDS`) of
    the specialist that caused it; -1 where nothing changed or no specialist was active."""
    gen, labels = gen_log_probs.double(), labels.long()
    gen_right, ens_right = gen.argmax(1) == labels, combined_log_probs.argmax(1) == labels
    changed = gen_right != ens_right
    best_effect = torch.full((len(labels),), float("nan"), dtype=torch.float64)
    best_kind = torch.full((len(labels),), -1, dtype=torch.long)
    for m, (group, spec) in enumerate(zip(groups, spec_log_probs)):
        rows = (active[:, m] & changed).nonzero().squeeze(1)
        if not len(rows):
            continue
        position = torch.full((int(gen.shape[1]),), len(group), dtype=torch.long)   # the dustbin
        position[group] = torch.arange(len(group))
        bucket = position[labels[rows]]
        own = torch.log_softmax(spec[rows].double(), dim=1).gather(1, bucket[:, None]).squeeze(1)
        base = _folded_generalist(gen[rows], group).gather(1, bucket[:, None]).squeeze(1)
        # a break is caused by the most negative effect on the true class, a fix by the most positive
        effect = torch.where(gen_right[rows], own - base, base - own)
        core = len(group) if num_core is None else int(num_core[m])
        kind = torch.where(bucket == len(group), 2, torch.where(bucket < core, 0, 1))
        better = torch.isnan(best_effect[rows]) | (effect < best_effect[rows])
        best_effect[rows[better]] = effect[better]
        best_kind[rows[better]] = kind[better]
    return best_kind


def causes_by_coverage(gen_right: torch.Tensor, ens_right: torch.Tensor, best_kind: torch.Tensor,
                       covering: torch.Tensor, last: int = 10) -> list[dict]:
    """Rows by the number of specialists covering the true class (as :func:`combine.metrics.table4`):
    broken and fixed counts, and how many of each a specialist of each kind caused."""
    bucket_of = covering.clamp(max=last)
    out = []
    for b in range(int(bucket_of.max()) + 1 if len(bucket_of) else 0):
        sel = bucket_of == b
        row = {"covering": f"{b}+" if b == last else str(b), "examples": int(sel.sum())}
        for name, mask in (("broken", sel & gen_right & ~ens_right), ("fixed", sel & ~gen_right & ens_right)):
            row[name] = int(mask.sum())
            row[f"{name}_by"] = {kind: int((mask & (best_kind == k)).sum()) for k, kind in enumerate(KINDS)}
            row[f"{name}_by"]["none active"] = int((mask & (best_kind < 0)).sum())
        out.append(row)
    return out


def table4_causes(gen_log_probs: torch.Tensor, combined_log_probs: torch.Tensor, labels: torch.Tensor,
                  groups: Sequence[torch.Tensor], spec_log_probs: Sequence[torch.Tensor], active: torch.Tensor,
                  covering: torch.Tensor, num_core: Sequence[int] | None = None, last: int = 10) -> list[dict]:
    """:func:`causes_by_coverage` of :func:`change_causes`, for outputs held whole."""
    labels = labels.long()
    kinds = change_causes(gen_log_probs, combined_log_probs, labels, groups, spec_log_probs, active, num_core)
    return causes_by_coverage(gen_log_probs.argmax(1) == labels, combined_log_probs.argmax(1) == labels,
                              kinds, covering, last)
