"""Synthetic generalist predictions with planted confusable groups, at any scale (K = 15,000 in seconds).

The clustering stage is judged on whether it recovers groups of classes that a generalist confuses.
Real predictions have three properties that make the choice of matrix matter, so the generator has
them too: class frequencies differ by orders of magnitude (a frequent class has a large variance,
which sits on the covariance's diagonal), confidence differs from class to class, and some of the
probability mass lands on unrelated classes (noise that is not group structure).

Each row puts ``confidence`` on its true class, most of the rest on a few classes of the same planted
group, a little on random classes, and (dense form only) a thin ``tail_mass`` over every class, as a
softmax would. The sparse form keeps only the head, i.e. exactly what a top-k store of the dense
rows holds: its rows sum to ``1 - tail_mass``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class SyntheticPredictions:
    probs: np.ndarray | sp.csr_matrix   # [N, K] predicted probabilities (dense float32 or CSR head)
    labels: np.ndarray                  # [N] int64: the true class of each row
    group_of: np.ndarray                # [K] int64: the planted group of each class
    frequency: np.ndarray               # [K] float64: how often each class is the true class

    @property
    def num_classes(self) -> int:
        return int(self.probs.shape[1])

    @property
    def num_groups(self) -> int:
        return int(self.group_of.max()) + 1


def make_synthetic_predictions(
    num_classes: int,
    num_examples: int,
    group_size: int = 5,
    *,
    mates_per_row: int = 6,
    noise_classes: int = 2,
    noise_share: float = 0.25,
    confidence: tuple[float, float] = (0.35, 0.9),
    frequency_spread: float = 1.0,
    tail_mass: float = 0.02,
    dense: bool = False,
    seed: int = 0,
) -> SyntheticPredictions:
    """Predictions of an imagined generalist on ``num_examples`` held-out rows over ``num_classes``.

    ``frequency_spread`` is the sigma of the log-normal class frequencies (0 = balanced classes,
    1 = the most frequent classes ~50x the rarest); ``confidence`` is the range of per-class mean
    probability on the true class; ``noise_share`` of the non-true mass goes to ``noise_classes``
    random classes. ``dense=True`` returns an [N, K] float32 array whose rows sum to one (needs
    N*K*4 bytes); otherwise a CSR matrix of the head only.
    """
    if num_classes < 2 or num_examples < 1 or group_size < 1:
        raise ValueError("need num_classes >= 2, num_examples >= 1, group_size >= 1")
    rng = np.random.default_rng(seed)
    K, N = num_classes, num_examples

    # planted groups: a random partition of the classes into blocks of ~group_size
    num_groups = max(1, K // group_size)
    order = rng.permutation(K)
    blocks = np.array_split(order, num_groups)
    sizes = np.array([len(b) for b in blocks])
    members = np.zeros((num_groups, sizes.max()), dtype=np.int64)
    group_of = np.empty(K, dtype=np.int64)
    position = np.empty(K, dtype=np.int64)
    for g, block in enumerate(blocks):
        members[g, : len(block)] = block
        group_of[block] = g
        position[block] = np.arange(len(block))

    frequency = rng.lognormal(0.0, frequency_spread, K) if frequency_spread > 0 else np.ones(K)
    frequency /= frequency.sum()
    labels = rng.choice(K, size=N, p=frequency).astype(np.int64)

    # per-class mean confidence, per-row confidence ~ Beta around it
    lo, hi = confidence
    mean_conf = rng.uniform(lo, hi, K)[labels]
    concentration = 12.0
    conf = rng.beta(mean_conf * concentration, (1.0 - mean_conf) * concentration)

    g = group_of[labels]
    size_g = sizes[g]
    has_mates = size_g > 1
    # mates: other members of the true class's group (never the class itself)
    offset = 1 + (rng.random((N, mates_per_row)) * np.maximum(size_g - 1, 1)[:, None]).astype(np.int64)
    mate_pos = (position[labels][:, None] + offset) % size_g[:, None]
    mates = members[g[:, None], mate_pos]
    noise = rng.integers(0, K, size=(N, noise_classes))

    rest = 1.0 - conf
    # mass not on the true class: mostly to group mates, noise_share to random classes; a class
    # without mates (a group of one) sends it all to noise, or keeps it when there is no noise
    mate_share = np.where(has_mates, 1.0 - (noise_share if noise_classes else 0.0), 0.0)
    if not noise_classes:
        conf = conf + rest * (1.0 - mate_share)
    mate_w = rng.gamma(1.0, size=(N, mates_per_row))
    mate_w *= (rest * mate_share / mate_w.sum(1))[:, None]
    noise_w = rng.gamma(1.0, size=(N, noise_classes))
    if noise_classes:
        noise_w *= (rest * (1.0 - mate_share) / noise_w.sum(1))[:, None]

    cols = np.concatenate([labels[:, None], mates, noise], axis=1)
    vals = np.concatenate([conf[:, None], mate_w, noise_w], axis=1) * (1.0 - tail_mass)
    width = cols.shape[1]
    head = sp.csr_matrix((vals.ravel().astype(np.float32), cols.ravel(), np.arange(0, N * width + 1, width)),
                         shape=(N, K))
    head.sum_duplicates()
    if not dense:
        return SyntheticPredictions(head, labels, group_of, frequency)

    tail = rng.random((N, K), dtype=np.float32)
    tail *= (tail_mass / tail.sum(1, dtype=np.float64)).astype(np.float32)[:, None]
    tail += head.toarray()
    return SyntheticPredictions(tail, labels, group_of, frequency)
