"""The numbers the evaluation reports for each system: the paper's tables 3 and 4, top-5, NLL, ECE.

All take log-probabilities [N, K] and int64 labels [N] as torch tensors.
"""

from __future__ import annotations

import torch


def top1_correct(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return log_probs.argmax(dim=1) == labels


def top_k_accuracy(log_probs: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    top = log_probs.topk(min(k, log_probs.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(dim=1).double().mean())


def negative_log_likelihood(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean -log q(label) (nats); a label given probability 0 counts as -log(smallest float)."""
    picked = log_probs.double().gather(1, labels[:, None]).squeeze(1)
    floor = torch.log(torch.tensor(torch.finfo(log_probs.dtype).tiny, dtype=torch.float64))
    return float(-picked.clamp_min(floor).mean())


def expected_calibration_error(log_probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017): sum_b |acc_b - conf_b| * n_b / N."""
    conf, pred = torch.exp(log_probs.double()).max(dim=1)
    correct = (pred == labels).double()
    which = (conf * bins).long().clamp(max=bins - 1)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, conf)
    return float((acc_sum - conf_sum).abs().sum() / max(1, len(labels)))


def conditional_accuracy(log_probs: torch.Tensor, labels: torch.Tensor,
                         classes: torch.Tensor) -> tuple[float | None, int]:
    """Paper Table 3's conditional accuracy: only the examples whose true class is one of
    ``classes`` (the specialists' classes), with the prediction restricted to those classes.
    Returns (accuracy or None when no example qualifies, number of examples)."""
    member = torch.zeros(log_probs.shape[1], dtype=torch.bool)
    member[classes] = True
    rows = member[labels]
    n = int(rows.sum())
    if n == 0:
        return None, 0
    restricted = log_probs[rows].masked_fill(~member, -torch.inf)
    return float((restricted.argmax(dim=1) == labels[rows]).double().mean()), n


class SystemTally:
    """One system's numbers (accuracy, top-5, NLL, ECE, conditional accuracy) summed over chunks of
    rows (:meth:`add`), so no [N, K] array is needed; :meth:`result` is :func:`system_metrics`."""

    def __init__(self, num_classes: int, specialist_classes: torch.Tensor, bins: int = 15) -> None:
        self.member = torch.zeros(num_classes, dtype=torch.bool)
        self.member[specialist_classes] = True
        self.bins = bins
        self.n = self.correct = self.top5 = self.cond_n = self.cond_correct = 0
        self.nll = 0.0
        self.acc_sum = torch.zeros(bins, dtype=torch.float64)
        self.conf_sum = torch.zeros(bins, dtype=torch.float64)

    def add(self, log_probs: torch.Tensor, labels: torch.Tensor) -> None:
        if not len(labels):
            return
        self.n += len(labels)
        self.correct += int(top1_correct(log_probs, labels).sum())
        top = log_probs.topk(min(5, log_probs.shape[1]), dim=1).indices
        self.top5 += int((top == labels[:, None]).any(dim=1).sum())
        picked = log_probs.double().gather(1, labels[:, None]).squeeze(1)
        floor = torch.log(torch.tensor(torch.finfo(log_probs.dtype).tiny, dtype=torch.float64))
        self.nll += float(-picked.clamp_min(floor).sum())
        conf, pred = torch.exp(log_probs.double()).max(dim=1)
        which = (conf * self.bins).long().clamp(max=self.bins - 1)
        self.acc_sum.index_add_(0, which, (pred == labels).double())
        self.conf_sum.index_add_(0, which, conf)
        rows = self.member[labels]
        if rows.any():
            restricted = log_probs[rows].masked_fill(~self.member, -torch.inf)
            self.cond_n += int(rows.sum())
            self.cond_correct += int((restricted.argmax(dim=1) == labels[rows]).sum())

    def result(self) -> dict:
        n = max(1, self.n)
        return {
            "accuracy": self.correct / n,
            "top5": self.top5 / n,
            "nll": self.nll / n,
            "ece": float((self.acc_sum - self.conf_sum).abs().sum() / n),
            "conditional_accuracy": self.cond_correct / self.cond_n if self.cond_n else None,
        }


def system_metrics(log_probs: torch.Tensor, labels: torch.Tensor, specialist_classes: torch.Tensor) -> dict:
    tally = SystemTally(log_probs.shape[1], specialist_classes)
    tally.add(log_probs, labels)
    return tally.result()


def table4(base_correct: torch.Tensor, combined_correct: torch.Tensor, covering: torch.Tensor,
           last: int = 10) -> list[dict]:
    """Paper Table 4: rows by the number of specialists covering the correct class (0, 1, ...,
    ``last``+), each with the number of examples, the change in top-1 correct, and the relative
    accuracy change (the change over the baseline's correct count in that row)."""
    bucket = covering.clamp(max=last)
    rows = []
    for b in range(int(bucket.max()) + 1 if len(bucket) else 0):
        sel = bucket == b
        n = int(sel.sum())
        base = int(base_correct[sel].sum())
        new = int(combined_correct[sel].sum())
        rows.append({
            "covering": f"{b}+" if b == last else str(b),
            "examples": n,
            "base_correct": base,
            "combined_correct": new,
            "delta_correct": new - base,
            "relative_change": (new - base) / base if base else None,
        })
    return rows
