"""The numbers the evaluation reports for each system: the paper's tables 3 and 4, top-5, NLL, ECE.

All take log-probabilities [N, K] and int64 labels [N] as torch tensors.
"""

from __future__ import annotations

import torch


def top1_correct(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return log_probs.argmax(dim=1) == labels


# Each number as per-batch sums (what SystemTally adds up over chunks) and as a mean over one batch.


def _top_k_hits(log_probs: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    top = log_probs.topk(min(k, log_probs.shape[1]), dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


def _nll_sum(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    picked = log_probs.double().gather(1, labels[:, None]).squeeze(1)
    floor = torch.log(torch.tensor(torch.finfo(log_probs.dtype).tiny, dtype=torch.float64))
    return float(-picked.clamp_min(floor).sum())


def _calibration_sums(log_probs: torch.Tensor, labels: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per equal-width confidence bin: the number right and the summed confidence."""
    conf, pred = torch.exp(log_probs.double()).max(dim=1)
    which = (conf * bins).long().clamp(max=bins - 1)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, (pred == labels).double())
    return acc_sum, torch.zeros(bins, dtype=torch.float64).index_add_(0, which, conf)


def _conditional_hits(log_probs: torch.Tensor, labels: torch.Tensor, member: torch.Tensor) -> tuple[int, int]:
    """(right, examples) among the examples whose class is a member, predictions restricted to members."""
    rows = member[labels]
    n = int(rows.sum())
    if n == 0:
        return 0, 0
    restricted = log_probs[rows].masked_fill(~member, -torch.inf)
    return int((restricted.argmax(dim=1) == labels[rows]).sum()), n


def top_k_accuracy(log_probs: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    return _top_k_hits(log_probs, labels, k) / max(1, len(labels))


def negative_log_likelihood(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean -log q(label) (nats); a label given probability 0 counts as -log(smallest float)."""
    return _nll_sum(log_probs, labels) / max(1, len(labels))


def expected_calibration_error(log_probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017): sum_b |acc_b - conf_b| * n_b / N."""
    acc_sum, conf_sum = _calibration_sums(log_probs, labels, bins)
    return float((acc_sum - conf_sum).abs().sum() / max(1, len(labels)))


def _membership(num_classes: int, classes: torch.Tensor) -> torch.Tensor:
    member = torch.zeros(num_classes, dtype=torch.bool)
    member[classes] = True
    return member


def conditional_accuracy(log_probs: torch.Tensor, labels: torch.Tensor,
                         classes: torch.Tensor) -> tuple[float | None, int]:
    """Paper Table 3's conditional accuracy: only the examples whose true class is one of
    ``classes`` (the specialists' classes), with the prediction restricted to those classes.
    Returns (accuracy or None when no example qualifies, number of examples)."""
    right, n = _conditional_hits(log_probs, labels, _membership(log_probs.shape[1], classes))
    return (right / n if n else None), n


class SystemTally:
    """One system's numbers (accuracy, top-5, NLL, ECE, conditional accuracy) summed over chunks of
    rows (:meth:`add`), so no [N, K] array is needed; :meth:`result` is :func:`system_metrics`."""

    def __init__(self, num_classes: int, specialist_classes: torch.Tensor, bins: int = 15) -> None:
        self.member = _membership(num_classes, specialist_classes)
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
        self.top5 += _top_k_hits(log_probs, labels, 5)
        self.nll += _nll_sum(log_probs, labels)
        acc_sum, conf_sum = _calibration_sums(log_probs, labels, self.bins)
        self.acc_sum += acc_sum
        self.conf_sum += conf_sum
        right, n = _conditional_hits(log_probs, labels, self.member)
        self.cond_correct += right
        self.cond_n += n

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
