"""Gating: consult a specialist only where held-out data says it helps (``combine.gate``).

The KL combiner gives every active specialist as much say as the generalist, so a specialist that is
worse than the generalist on the examples that activate it lowers accuracy, and more so the more
specialists cover a class (the fall of paper Table 4 measured on hanzi-1k). Two gates, each fitted
on the held-out split only and then applied unchanged to the test split and to the student's
ensemble teacher:

* ``group_gain``: keep specialist m only when, on the held-out examples that activate it, the
  generalist combined with m alone gets more of them right than the generalist alone;
* ``confidence``: consult the specialists only on examples where the generalist's top probability
  is below a threshold, the one (from a grid of held-out quantiles) that maximises held-out accuracy
  (Bochereau & Bourgine 1990: ask the expert when the generalist is unsure);
* ``both``: the kept specialists, below the threshold.

With ``combine.weighting: fitted`` each consulted specialist also gets a weight in the KL objective
(eq. 5 with ``w_m KL(p_m || q_m)``; the generalist's weight is 1): the one of :data:`WEIGHT_GRID` with
the lowest held-out log-loss on the held-out examples where it speaks (:func:`fit_weights`). 0 silences
it, below 1 it has less say than the generalist.

``combine/gating.json`` records the gate and the weights; one fitted for another set of specialists is
refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from combine.kl import kl_combine
from specdistill.artifacts import read_json, write_json
from specdistill.errors import SpecdistillError

if TYPE_CHECKING:
    from combine.outputs import SplitOutputs

GATES = ("none", "group_gain", "confidence", "both")
WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)
WEIGHT_ROUNDS = 2   # each round refits every weight with the others at the previous round's values


@dataclass
class Gate:
    kind: str
    keep: list[bool]                 # per specialist, in the ensemble's order
    threshold: float = 1.0           # consult specialists where the generalist's top probability < threshold
    held_out: dict | None = None     # what the choice was made on: accuracies, candidates
    weights: list[float] | None = None   # per specialist, its weight in the KL objective (None: all 1)

    @classmethod
    def open(cls, num_specialists: int) -> Gate:
        return cls("none", [True] * num_specialists, 1.0)

    @property
    def is_open(self) -> bool:
        """Every specialist speaks wherever the top-n rule says, with the paper's equal weight."""
        return self.kind == "none" and self.weights is None

    def apply(self, active: torch.Tensor, gen_log_probs: torch.Tensor) -> torch.Tensor:
        """The [B, M] active mask with the gate's closed specialists (weight 0 included) and confident
        examples removed."""
        keep = torch.as_tensor(self.keep, dtype=torch.bool, device=active.device)
        if self.weights is not None:
            keep = keep & (torch.as_tensor(self.weights, device=active.device) > 0)
        unsure = gen_log_probs.max(dim=1).values.exp() < self.threshold if self.threshold < 1.0 else \
            torch.ones(len(active), dtype=torch.bool, device=active.device)
        return active & keep[None, :] & unsure[:, None]

    def write(self, path: str | os.PathLike) -> None:
        write_json(path, asdict(self))

    @classmethod
    def read(cls, path: str | os.PathLike, num_specialists: int) -> Gate:
        raw = read_json(path)
        if not isinstance(raw, dict) or not isinstance(raw.get("keep"), list) or len(raw["keep"]) != num_specialists:
            found = len(raw["keep"]) if isinstance(raw, dict) and isinstance(raw.get("keep"), list) else 0
            raise SpecdistillError(f"{path} gates {found} specialists but the run has {num_specialists}; rerun the "
                                   "combine stage (specdistill run CONFIG --from combine)")
        weights = raw.get("weights")
        if weights is not None and (not isinstance(weights, list) or len(weights) != num_specialists):
            raise SpecdistillError(f"{path} weights {len(weights) if isinstance(weights, list) else 0} specialists "
                                   f"but the run has {num_specialists}; rerun the combine stage "
                                   "(specdistill run CONFIG --from combine)")
        return cls(str(raw.get("kind", "none")), [bool(k) for k in raw["keep"]], float(raw.get("threshold", 1.0)),
                   raw.get("held_out"), None if weights is None else [float(w) for w in weights])


def _correct(gen: torch.Tensor, groups: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
             active: torch.Tensor, labels: torch.Tensor, rule) -> torch.Tensor:
    q = kl_combine(gen, groups, outputs, solver=rule.solver, max_iter=rule.max_iter, tol=rule.tol, active=active)
    return q.argmax(1) == labels


def fit_weights(outputs: SplitOutputs, rule, gate: Gate, progress: Callable[[str], None] = print) -> Gate:
    """Per-specialist weights in the KL objective, fitted on these held-out outputs within ``gate``.

    For each specialist, every weight of :data:`WEIGHT_GRID` is tried on the held-out examples where
    it speaks, the other specialists at their current weights, and the one with the lowest log-loss
    (the negative log-probability of the true class) is kept; :data:`WEIGHT_ROUNDS` rounds, each one
    pass over the outputs. A specialist that never speaks on held-out data keeps weight 1. Returns
    the gate with ``weights`` set and the held-out record extended.
    """
    groups, M, N = outputs.groups, len(outputs.groups), max(1, len(outputs))
    weights = np.ones(M)
    record = dict(gate.held_out or {})
    rounds = []
    for r in range(WEIGHT_ROUNDS):
        loss = np.zeros((M, len(WEIGHT_GRID)))
        right = np.zeros((M, len(WEIGHT_GRID)), dtype=np.int64)
        seen = np.zeros(M, dtype=np.int64)
        for c in outputs.chunks(f"weights, held-out round {r + 1}"):
            active = gate.apply(c.active(outputs.membership, rule.top_n), c.gen)
            for m in np.flatnonzero(active.any(dim=0).numpy()):
                rows = active[:, m]
                sub_gen, sub_specs, sub_active = c.gen[rows], [o[rows] for o in c.specs], active[rows]
                labels = c.labels[rows]
                seen[m] += len(labels)
                for j, w in enumerate(WEIGHT_GRID):
                    trial = torch.tensor(weights)   # a copy: the others stay at this round's start
                    trial[m] = w
                    q = kl_combine(sub_gen, groups, sub_specs, solver=rule.solver, max_iter=rule.max_iter,
                                   tol=rule.tol, active=sub_active, weights=trial)
                    loss[m, j] -= float(q.gather(1, labels[:, None]).double().sum())
                    right[m, j] += int((q.argmax(1) == labels).sum())
        spoke = seen > 0
        weights = np.where(spoke, np.asarray(WEIGHT_GRID)[loss.argmin(axis=1)], 1.0)
        rounds.append({"weights": weights.tolist(), "examples": seen.tolist(),
                       "log_loss": (loss / np.maximum(seen, 1)[:, None]).round(5).tolist(),
                       "correct": right.tolist()})
    systems = {"weighted": Gate(gate.kind, gate.keep, gate.threshold, weights=weights.tolist()),
               "equal_weights": Gate(gate.kind, gate.keep, gate.threshold)}
    right = dict.fromkeys([*systems, "generalist"], 0)
    for c in outputs.chunks("weights, held-out score"):
        rule_active = c.active(outputs.membership, rule.top_n)
        for name, g in systems.items():
            q = kl_combine(c.gen, groups, c.specs, solver=rule.solver, max_iter=rule.max_iter, tol=rule.tol,
                           active=g.apply(rule_active, c.gen), weights=g.weights)
            right[name] += int((q.argmax(1) == c.labels).sum())
        right["generalist"] += int((c.gen.argmax(1) == c.labels).sum())
    gate.weights = weights.tolist()
    record.update({"weight_grid": list(WEIGHT_GRID), "weight_rounds": rounds,
                   **{f"{name}_acc": n / N for name, n in right.items()}})
    gate.held_out = record
    counts = {w: int((weights == w).sum()) for w in WEIGHT_GRID}
    progress("combine: weights fitted on held-out data (log-loss): "
             + ", ".join(f"{n} at {w:g}" for w, n in counts.items() if n)
             + f"; held-out accuracy {record['weighted_acc']:.4f}")
    return gate


def fit_gate(kind: str, outputs: SplitOutputs, rule, progress: Callable[[str], None] = print) -> Gate:
    """The gate of ``kind`` that does best on these held-out outputs (:class:`combine.outputs.SplitOutputs`,
    read a chunk of rows at a time: one pass for the specialists' gains, one for the thresholds)."""
    if kind not in GATES:
        raise SpecdistillError(f"unknown gate {kind!r}; choose one of: {', '.join(GATES)}")
    groups, M, N = outputs.groups, len(outputs.groups), max(1, len(outputs))
    gate = Gate.open(M)
    gen_right = ungated_right = 0
    gains = [0] * M
    confidence = []
    # pass 1: the generalist, the ungated ensemble, each specialist alone
    for c in outputs.chunks("gate, held-out pass 1"):
        active = c.active(outputs.membership, rule.top_n)
        gen_correct = c.gen.argmax(1) == c.labels
        gen_right += int(gen_correct.sum())
        ungated_right += int(_correct(c.gen, groups, c.specs, active, c.labels, rule).sum())
        confidence.append(c.gen.max(dim=1).values.exp())
        if kind in ("group_gain", "both"):
            for m in range(M):
                rows = active[:, m]
                if rows.any():
                    alone = torch.zeros_like(active[rows])
                    alone[:, m] = True
                    sub = [o[rows] for o in c.specs]
                    gains[m] += (int(_correct(c.gen[rows], groups, sub, alone, c.labels[rows], rule).sum())
                                 - int(gen_correct[rows].sum()))
    record: dict = {"generalist_acc": gen_right / N, "ungated_acc": ungated_right / N}
    if kind in ("group_gain", "both"):
        gate.keep = [g > 0 for g in gains]
        record["group_gains"] = gains
    candidates = [1.0]
    if kind in ("confidence", "both"):
        confidence = torch.cat(confidence) if confidence else torch.zeros(0)
        candidates = sorted({1.0, *np.quantile(confidence.numpy(), np.linspace(0.05, 0.95, 19)).round(4).tolist()}) \
            if len(confidence) else [1.0]
    right = dict.fromkeys(candidates, 0)
    # pass 2: every candidate threshold (just the kept set for group_gain)
    for c in outputs.chunks("gate, held-out pass 2"):
        active = c.active(outputs.membership, rule.top_n)
        for tau in candidates:
            gate.threshold = float(tau)
            right[tau] += int(_correct(c.gen, groups, c.specs, gate.apply(active, c.gen), c.labels, rule).sum())
    scores = {tau: r / N for tau, r in right.items()}
    best = max(scores.values())
    gate.threshold = float(min(t for t, s in scores.items() if s == best))   # ties: consult fewer
    if record["ungated_acc"] > best:
        # the kept set is judged one specialist at a time; together (several active at top-n > 1) the
        # closed ones may help: never choose a gate worse on held-out data than consulting every one
        gate.keep, gate.threshold, best = [True] * M, 1.0, record["ungated_acc"]
        record["fell_back_to_open"] = True
    if kind in ("confidence", "both"):
        record["threshold_candidates"] = {f"{t:g}": s for t, s in scores.items()}
    gate.kind = kind
    record["gated_acc"] = best
    gate.held_out = record
    progress(f"combine: gate '{kind}' fitted on held-out data: keeps {sum(gate.keep)} of {M} specialists"
             + (f", consulted below top probability {gate.threshold:.3f}" if gate.threshold < 1.0 else "")
             + f"; held-out accuracy {record['generalist_acc']:.4f} (generalist) -> {record['ungated_acc']:.4f} "
               f"(ungated) -> {record['gated_acc']:.4f} (gated)")
    return gate
