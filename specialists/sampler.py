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

Activation-matched dustbin (``specialists.confusion_fraction`` = c > 0): at inference a specialist
is consulted where the generalist's top-n hits its group, so the examples of other classes it meets
there are the generalist's confusions into the group. ``round(c x dustbin half)`` of every batch's
dustbin examples are then drawn from those confusions on the training split (their own endless
permutation stream), the rest from the remainder as before; :func:`specialists.dustbin.confusion_correction`
undoes the extra prior. A group the generalist never confuses anything into keeps the random dustbin.
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


def confusion_indices(labels: np.ndarray, top: np.ndarray, classes: np.ndarray | list[int]) -> np.ndarray:
    """Training examples outside the group whose generalist top-n (``top``: [N, n] class ids, best
    first) holds a group class: the examples of other classes that activate the specialist."""
    classes = np.asarray(classes)
    top = np.asarray(top).reshape(len(labels), -1)
    return np.flatnonzero(~np.isin(np.asarray(labels), classes) & np.isin(top, classes).any(axis=1))


class SpecialistBatchSampler(Sampler):
    """Yields index arrays into the training split; ``set_epoch`` reseeds (the engine calls it)."""

    def __init__(self, labels: np.ndarray, classes: np.ndarray | list[int], batch_size: int,
                 specialist_fraction: float = 0.5, seed: int = 0, confusion_index: np.ndarray | None = None,
                 confusion_fraction: float = 0.0) -> None:
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
        self.confusion_index = np.zeros(0, np.int64) if confusion_index is None else np.asarray(confusion_index)
        if len(self.confusion_index) and not np.isin(self.confusion_index, self.other_index).all():
            raise SpecdistillError("confusion examples must lie outside the group")
        self.confusion_per_batch = (min(self.other_per_batch, round(self.other_per_batch * confusion_fraction))
                                    if len(self.confusion_index) else 0)
        self.seed = seed
        self.epoch = 0

    @property
    def training_fraction(self) -> float:
        """The group's share of every batch (``specialist_fraction`` rounded to whole examples)."""
        return self.group_per_batch / self.batch_size

    @property
    def confusion_share(self) -> float:
        """The confusions' share of every batch's dustbin examples (0: all drawn at random)."""
        return self.confusion_per_batch / self.other_per_batch

    @property
    def confusion_rate(self) -> float:
        """``P(top-n hits the group | label outside it)`` on the training split."""
        return len(self.confusion_index) / len(self.other_index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _stream(self, index: np.ndarray, stream_id: int, start: int, count: int) -> np.ndarray:
        """Positions ``[start, start + count)`` of one endless stream of permutations of ``index``.

        Permutation ``c`` of the stream is seeded by ``(seed, stream_id, c)`` alone, so epoch ``e``
        continues where epoch ``e - 1`` stopped (no repeats until every example has been seen) and
        a resumed run draws the same examples.
        """
        if count == 0:
            return np.zeros(0, np.int64)
        size = len(index)
        first, last = start // size, (start + count - 1) // size
        stream = np.concatenate([np.random.default_rng((self.seed, stream_id, c)).permutation(index)
                                 for c in range(first, last + 1)])
        return stream[start - first * size:start - first * size + count]

    def __iter__(self):
        rng = np.random.default_rng((self.seed, 0, self.epoch))
        reps = math.ceil(self.num_batches * self.group_per_batch / len(self.group_index))
        group = np.concatenate([rng.permutation(self.group_index) for _ in range(reps)])
        n_random = self.other_per_batch - self.confusion_per_batch
        other = self._stream(self.other_index, 1, self.epoch * self.num_batches * n_random, self.num_batches * n_random)
        confused = self._stream(self.confusion_index, 2, self.epoch * self.num_batches * self.confusion_per_batch,
                                self.num_batches * self.confusion_per_batch)
        for b in range(self.num_batches):
            yield np.concatenate([group[b * self.group_per_batch:(b + 1) * self.group_per_batch],
                                  confused[b * self.confusion_per_batch:(b + 1) * self.confusion_per_batch],
                                  other[b * n_random:(b + 1) * n_random]])

    def __len__(self) -> int:
        return self.num_batches
