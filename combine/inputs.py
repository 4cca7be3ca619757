"""Checking and normalising what a caller hands the combiner, so every solver sees the same thing.

Bad input (shapes that do not match the groups, class ids out of range, NaN) is one
:class:`SpecdistillError` line naming the problem and the fix, never a deep indexing error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from specdistill.errors import SpecdistillError


@dataclass
class CombineInputs:
    gen_log_probs: torch.Tensor          # [B, K], as given (dtype and device of the output)
    groups: list[torch.Tensor]           # M int64 tensors on the same device
    spec_log_probs: list[torch.Tensor]   # M tensors [B, |S_m| + 1], dustbin last
    covers_all: list[bool]               # group m holds every class: its dustbin is empty
    values_checked: bool = True          # False: the specialists' NaN check is left to the reader
    weights: torch.Tensor | None = None  # [M] float64 weight of each specialist's KL term (None: all 1)

    @property
    def num_classes(self) -> int:
        return self.gen_log_probs.shape[1]


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (np.ndarray, list, tuple)):
        return torch.as_tensor(np.asarray(x))
    raise SpecdistillError(f"{what} is a {type(x).__name__}; pass a torch tensor or a numpy array")


def _check_values(x: torch.Tensor, what: str) -> None:
    if x.numel() == 0:
        return
    top = x.max()  # NaN propagates through max; one pass instead of isnan + isinf
    if torch.isnan(top) or torch.isposinf(top):
        bad = "NaN" if torch.isnan(x).any() else "+inf"
        raise SpecdistillError(f"{what} contains {bad}; pass finite log-probabilities "
                               "(log_softmax of the model's logits)")


def check_inputs(gen_log_probs, groups: Sequence, spec_log_probs: Sequence,
                 check_values: bool = True, weights=None) -> CombineInputs:
    """Validate shapes, class ids and values; move everything to the generalist's device.

    ``check_values=False`` leaves the NaN checks to the caller: the combiner checks the generalist
    on row maxima it computes anyway (:func:`check_row_max`) and a specialist only on the rows
    where it is active (the only ones it reads), saving passes as large as the inputs.
    """
    gen = _as_tensor(gen_log_probs, "gen_log_probs")
    if gen.dim() != 2 or not gen.is_floating_point():
        raise SpecdistillError(f"gen_log_probs must be a float [B, K] array, got shape {tuple(gen.shape)} "
                               f"of {gen.dtype}; pass the generalist's log-probabilities")
    B, K = gen.shape
    if K < 1:
        raise SpecdistillError("gen_log_probs has no classes (K = 0); pass [B, K] log-probabilities")
    if isinstance(groups, (torch.Tensor, np.ndarray)) or not isinstance(groups, Sequence):
        raise SpecdistillError("groups must be a list of class-id arrays, one per specialist")
    if isinstance(spec_log_probs, (torch.Tensor, np.ndarray)) or not isinstance(spec_log_probs, Sequence):
        raise SpecdistillError("spec_log_probs must be a list of [B, |group|+1] arrays, one per specialist")
    if len(groups) != len(spec_log_probs):
        raise SpecdistillError(f"{len(groups)} groups but {len(spec_log_probs)} specialist outputs; "
                               "pass one output per group, in the same order")
    if check_values:
        _check_values(gen, "gen_log_probs")
    device = gen.device
    out_groups, out_specs, covers_all = [], [], []
    for m, (group, spec) in enumerate(zip(groups, spec_log_probs)):
        g = _as_tensor(group, f"group {m}")
        if g.dim() != 1 or g.is_floating_point() or g.dtype == torch.bool:
            raise SpecdistillError(f"group {m} must be a 1-D array of integer class ids, "
                                   f"got shape {tuple(g.shape)} of {g.dtype}")
        if g.numel() == 0:
            raise SpecdistillError(f"group {m} is empty; every specialist needs at least one class")
        g = g.to(device=device, dtype=torch.int64)
        lo, hi = int(g.min()), int(g.max())
        if lo < 0 or hi >= K:
            raise SpecdistillError(f"group {m} names class {lo if lo < 0 else hi}, outside 0..{K - 1}; "
                                   "the groups must index the generalist's classes")
        if torch.unique(g).numel() != g.numel():
            raise SpecdistillError(f"group {m} lists a class twice; give each class once per group")
        s = _as_tensor(spec, f"spec_log_probs[{m}]")
        if s.dim() != 2 or s.shape[0] != B or s.shape[1] != g.numel() + 1 or not s.is_floating_point():
            raise SpecdistillError(
                f"specialist {m}'s output has shape {tuple(s.shape)} but its group has {g.numel()} "
                f"classes and the batch {B} rows; expected float [{B}, {g.numel() + 1}] "
                "(the group's classes in group order, then the dustbin)")
        s = s.to(device)
        if check_values:
            _check_values(s, f"spec_log_probs[{m}]")
        out_groups.append(g)
        out_specs.append(s)
        covers_all.append(g.numel() == K)
    return CombineInputs(gen, out_groups, out_specs, covers_all, check_values,
                         _check_weights(weights, len(out_groups), device))


def _check_weights(weights, num_specialists: int, device: torch.device) -> torch.Tensor | None:
    if weights is None:
        return None
    w = _as_tensor(weights if not isinstance(weights, (list, tuple)) else list(map(float, weights)), "weights")
    w = w.to(device=device, dtype=torch.float64)
    if w.shape != (num_specialists,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise SpecdistillError(f"weights must be {num_specialists} finite numbers >= 0, one per specialist "
                               f"(got shape {tuple(w.shape)}); leave them out for the paper's equal weights")
    return w


def check_row_max(row_max: torch.Tensor) -> None:
    """NaN anywhere in a row makes its max NaN (torch.max propagates NaN), so this checks it all."""
    _check_values(row_max, "gen_log_probs")


def normalise_specialist(log_probs: torch.Tensor, covers_all: bool) -> torch.Tensor:
    """Renormalise a specialist's [n, |S|+1] log-probabilities (float64), dustbin last.

    A group that holds every class leaves its dustbin nothing to stand for, so its probability is
    dropped and the group's own probabilities renormalised: the specialist then speaks only about
    how the mass splits among the classes, which is all it can mean.
    """
    lp = log_probs.double()
    if not covers_all:
        return torch.log_softmax(lp, dim=1)
    inside = torch.log_softmax(lp[:, :-1], dim=1)
    return torch.cat([inside, torch.full_like(lp[:, :1], -torch.inf)], dim=1)


def check_active(active, batch: int, num_specialists: int, device: torch.device) -> torch.Tensor:
    a = _as_tensor(active, "active")
    if a.shape != (batch, num_specialists):
        raise SpecdistillError(f"active has shape {tuple(a.shape)}; expected [{batch}, {num_specialists}] "
                               "(examples x specialists), or leave it out to use the top-n rule")
    return a.to(device=device, dtype=torch.bool)
