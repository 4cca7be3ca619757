"""The scalable path: k-means on a low-rank random sketch of the matrix's columns.

Exact k-means on the columns of a K x K matrix costs K^2 memory and O(K^2 k) per iteration, and the
covariance itself O(N K^2). A Gaussian projection Omega (K x d, entries N(0, 1/d)) keeps the
distances between columns to within ~sqrt(2/d) (Johnson-Lindenstrauss), and ``M @ Omega`` needs only
two products with the predictions X (``PredictionMatrix.matmul``): O(nnz(X) d) when X holds each
row's top-k probabilities. For K = 15,000 and d = 256 that is 15,000 points in 256 dimensions
instead of 15,000 in 15,000.
"""

from __future__ import annotations

import numpy as np

from clustering.matrices import PredictionMatrix


def gaussian_sketch(num_classes: int, dim: int, seed: int) -> np.ndarray:
    """Omega: [num_classes, dim] with N(0, 1/dim) entries, so projected lengths are unbiased."""
    rng = np.random.default_rng([seed, num_classes, dim])
    return rng.standard_normal((num_classes, dim), dtype=np.float32) / np.float32(np.sqrt(dim))


def class_points(matrix: PredictionMatrix, sketch_dim: int | None, seed: int,
                 progress: bool = True) -> np.ndarray:
    """The points k-means clusters, one row per class: column j of M exactly (``sketch_dim`` None
    or >= K), else its projection on a Gaussian sketch."""
    if sketch_dim is None or sketch_dim >= matrix.num_classes:
        return matrix.points_dense(progress)
    return matrix.points_sketch(gaussian_sketch(matrix.num_classes, sketch_dim, seed))
