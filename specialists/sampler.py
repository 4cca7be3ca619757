"""Half/half batches for a specialist: a fixed share from the group, the rest from everything else.

Paper section 5.2: "half its examples coming from its special subset and half sampled at random
from the remainder of the training set". Every batch has exactly ``round(batch_size * fraction)``
group examples, so the oversampling factor the dustbin correction undoes is the same for every
batch (not just on average). Within the group and within the remainder, examples are drawn
uniformly, so the classes keep their natural proportions inside each side: the prior shift is one
factor for the group and one for the dustbin, which is what :mod:`specialists.dustbin` assumes.

An epoch shows every group example once (so with ``fraction = 1/2`` it has twice as many examples
as the group): the group is what the specialist is for, and the remainder is far too large to cycle
through at the same pace. Remainder examples come from one endless stream of permutations that each
epoch continues, so the dustbin sees every remainder example once before any repeats.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler

from specdistill.errors import SpecdistillError


def fold_labels(labels: np.ndarray, classes: np.ndarray | list[int]) -> np.ndarray:
    """Global labels -> specialist labels: the i-th group class becomes i, every other class ``|S|``."""
    classes = np.asarray(classes, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    lookup = np.full(max(int(labels.max(initial=0)), int(classes.max())) + 1, len(classes), dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    return lookup[labels]


class SpecialistBatchSampler(Sampler):
    """Yields index arrays into the training split; ``set_epoch`` reseeds (the engine calls it)."""

    def __init__(self, labels: np.ndarray, classes: np.ndarray | list[int], batch_size: int,
                 specialist_fraction: float = 0.5, seed: int = 0) -> None:
        if batch_size < 2:
            raise SpecdistillError(f"specialists.train.batch_size={batch_size}: a half/half batch needs at "
                                   "least 2 examples")
        if not 0.0 < specialist_fraction < 1.0:
            raise SpecdistillError(f"specialist_fraction={specialist_fraction} must lie strictly between 0 and 1")
        inside = np.isin(np.asarray(labels), np.asarray(classes))
        self.group_index = np.flatnonzero(inside)
        self.other_index = np.flatnonzero(~inside)
        if len(self.group_index) == 0:
            raise SpecdistillError(f"no training examples of the group's classes {list(classes)[:10]}; "
                                   "check data.limit or rerun clustering with this data")
        if len(self.other_index) == 0:
            raise SpecdistillError("every training example belongs to the group; the dustbin needs others")
        self.batch_size = batch_size
        self.group_per_batch = min(batch_size - 1, max(1, round(batch_size * specialist_fraction)))
        self.other_per_batch = batch_size - self.group_per_batch
        self.num_batches = math.ceil(len(self.group_index) / self.group_per_batch)
        self.seed = seed
        self.epoch = 0

    @property
    def training_fraction(self) -> float:
        """The group's share of every batch (``specialist_fraction`` rounded to whole examples)."""
        return self.group_per_batch / self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _remainder(self, start: int, count: int) -> np.ndarray:
        """Positions ``[start, start + count)`` of one endless stream of remainder permutations.

        Permutation ``c`` of the stream is seeded by ``(seed, c)`` alone, so epoch ``e`` continues
        where epoch ``e - 1`` stopped (no repeats until every remainder example has been seen) and
        a resumed run draws the same examples.
        """
        size = len(self.other_index)
        first, last = start // size, (start + count - 1) // size
        stream = np.concatenate([np.random.default_rng((self.seed, 1, c)).permutation(self.other_index)
                                 for c in range(first, last + 1)])
        return stream[start - first * size:start - first * size + count]

    def __iter__(self):
        rng = np.random.default_rng((self.seed, 0, self.epoch))
        reps = math.ceil(self.num_batches * self.group_per_batch / len(self.group_index))
        group = np.concatenate([rng.permutation(self.group_index) for _ in range(reps)])
        per_epoch = self.num_batches * self.other_per_batch
        other = self._remainder(self.epoch * per_epoch, per_epoch)
        for b in range(self.num_batches):
            yield np.concatenate([group[b * self.group_per_batch:(b + 1) * self.group_per_batch],
                                  other[b * self.other_per_batch:(b + 1) * self.other_per_batch]])

    def __len__(self) -> int:
        return self.num_batches
