"""Predictions in, confusable class groups out: matrix -> points -> k-means -> size and overlap.

No files here: ``build.py`` reads and writes the run directory, the benchmark and the tests call
:func:`cluster_classes` on arrays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from clustering.kmeans import run_kmeans
from clustering.matrices import DEFAULT_MATRIX, PredictionMatrix
from clustering.overlap import coverage, drop_large, drop_small, groups_from_labels, grow_groups
from clustering.sketch import class_points
from specdistill.errors import SpecdistillError


@dataclass
class ClusterResult:
    groups: list[np.ndarray]        # final groups: k-means members first, then added classes
    cores: list[np.ndarray]         # the k-means clusters that survived min_size (no overlap)
    labels: np.ndarray              # [K] k-means cluster of every class (before dropping)
    dropped: int                    # k-means clusters smaller than min_size
    coverage: dict                  # see overlap.coverage
    inertia: float
    matrix: PredictionMatrix        # for pictures: exact columns on demand
    points: np.ndarray              # [K, D] what k-means clustered
    timings: dict = field(default_factory=dict)
    dropped_large: int = 0          # k-means clusters larger than max_size (their classes stay with the generalist)


def cluster_classes(probs: np.ndarray | sp.csr_matrix, k: int, *, matrix: str = DEFAULT_MATRIX,
                    backend: str = "faiss", seed: int = 0, n_init: int = 5, max_iter: int = 100,
                    sketch_dim: int | None = None, size: int | None = None, min_size: int = 1,
                    max_size: int | None = None, progress: bool = True) -> ClusterResult:
    """Group the K classes of ``probs`` ([N, K] probabilities, dense or CSR) into confusable groups.

    ``k`` clusters of the columns of the chosen matrix (``matrices.MATRIX_KINDS``); clusters smaller
    than ``min_size`` or larger than ``max_size`` are dropped; with ``size`` every group is grown to
    that many classes, adding the classes with the largest summed covariance with its members. Growing uses the plain
    covariance whatever ``matrix`` is: co-predicted probability mass is what a specialist has to sort
    out, while correlation would favour rare classes whose tiny variance inflates every correlation.
    """
    num_classes = probs.shape[1]
    if k > num_classes:
        raise SpecdistillError(f"k={k} is larger than the number of classes ({num_classes}); "
                               f"choose --k {num_classes} or fewer")
    if size is not None and size > num_classes:
        raise SpecdistillError(f"--size {size} is larger than the number of classes ({num_classes}); "
                               f"choose --size {num_classes} or fewer")
    timings = {}
    began = time.perf_counter()
    operator = PredictionMatrix(probs, matrix)
    points = class_points(operator, sketch_dim, seed, progress)
    timings["matrix_s"] = time.perf_counter() - began

    began = time.perf_counter()
    result = run_kmeans(points, k, backend=backend, seed=seed, n_init=n_init, max_iter=max_iter)
    timings["kmeans_s"] = time.perf_counter() - began

    began = time.perf_counter()
    clusters = groups_from_labels(result.labels, k)
    cores, dropped = drop_small(clusters, min_size)
    if not cores:
        raise SpecdistillError(f"every one of the {len(clusters)} groups has fewer than min_size={min_size} "
                               "classes; lower --min-size or --k")
    cores, dropped_large = drop_large(cores, max_size)
    if not cores:
        raise SpecdistillError(f"every group left has more than max_size={max_size} classes; raise "
                               "clustering.max_size (or leave it unset) or raise --k")
    groups = cores
    if size is not None:
        groups = grow_groups(cores, size, operator.cov_matmul, num_classes, progress=progress)
    timings["overlap_s"] = time.perf_counter() - began
    return ClusterResult(groups=groups, cores=cores, labels=result.labels, dropped=dropped, dropped_large=dropped_large,
                         coverage=coverage(groups, num_classes), inertia=result.inertia,
                         matrix=operator, points=points, timings=timings)
