"""Group sizes and overlap: drop useless small groups, grow groups to a fixed size, count coverage.

The paper's JFT specialists covered 300 classes each and overlapped: a class confusable with two
groups can sit in both. Growing a k-means cluster with the classes that covary most with it (the
largest row sums of the covariance over the cluster's columns) gives that overlap; the coverage
histogram says how many classes ended up in 0, 1, 2, ... groups.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

# C @ B for an indicator matrix B (one column per group): the summed covariance columns of each group
MatmulFn = Callable[[np.ndarray], np.ndarray]


def groups_from_labels(labels: np.ndarray, k: int) -> list[np.ndarray]:
    """k-means labels -> groups (sorted class ids), ordered by their smallest class so that the
    numbering does not depend on the backend's arbitrary cluster ids; empty clusters vanish."""
    groups = [np.flatnonzero(labels == c) for c in range(k)]
    groups = [g for g in groups if len(g)]
    groups.sort(key=lambda g: int(g[0]))
    return groups


def drop_small(groups: list[np.ndarray], min_size: int) -> tuple[list[np.ndarray], int]:
    """Keep groups with at least ``min_size`` classes: a specialist over one class has nothing to
    tell apart. Returns the kept groups and how many were dropped."""
    kept = [g for g in groups if len(g) >= min_size]
    return kept, len(groups) - len(kept)


def drop_large(groups: list[np.ndarray], max_size: int | None) -> tuple[list[np.ndarray], int]:
    """Keep groups of at most ``max_size`` classes (all when None): a giant k-means group is the
    classes without confusion signal, not a confusable set; they stay with the generalist."""
    if max_size is None:
        return groups, 0
    kept = [g for g in groups if len(g) <= max_size]
    return kept, len(groups) - len(kept)


def grow_groups(groups: list[np.ndarray], size: int, matmul: MatmulFn, num_classes: int,
                batch: int = 64, progress: bool = True) -> list[np.ndarray]:
    """Add to each group smaller than ``size`` the non-member classes whose summed ``matmul`` entries
    with the group's members are largest, until it has ``size`` classes.

    Groups already at least ``size`` keep all their classes (shrinking one would take classes away
    from their only specialist). The original members come first in each returned array.
    """
    size = min(size, num_classes)
    grown: list[np.ndarray] = list(groups)
    todo = [i for i, g in enumerate(groups) if len(g) < size]
    starts = range(0, len(todo), batch)
    for start in tqdm(starts, desc="grow groups", disable=not progress or len(starts) < 4, leave=False):
        chunk = todo[start:start + batch]
        indicator = np.zeros((num_classes, len(chunk)))
        for col, i in enumerate(chunk):
            indicator[groups[i], col] = 1.0
        scores = matmul(indicator)
        for col, i in enumerate(chunk):
            members = groups[i]
            score = scores[:, col].copy()
            score[members] = -np.inf
            need = size - len(members)
            # highest score first; ties broken by class id so the result is deterministic
            order = np.lexsort((np.arange(num_classes), -score))
            pool = order[:need]
            grown[i] = np.concatenate([members, pool])
    return grown


def coverage(groups: list[np.ndarray], num_classes: int) -> dict:
    """How many classes are covered by 0, 1, 2, ... groups, and summary numbers."""
    counts = np.bincount(np.concatenate(groups), minlength=num_classes) if groups else np.zeros(
        num_classes, dtype=np.int64)
    histogram = np.bincount(counts)
    return {
        "histogram": {str(n): int(c) for n, c in enumerate(histogram)},
        "uncovered": int((counts == 0).sum()),
        "mean_groups_per_class": float(counts.mean()),
        "max_groups_per_class": int(counts.max()),
        "group_sizes": {"min": int(min(map(len, groups))), "max": int(max(map(len, groups))),
                        "mean": float(np.mean([len(g) for g in groups]))} if groups else {},
    }
