"""k-means backends behind one registry: scikit-learn's KMeans and MiniBatchKMeans, and faiss.

MiniBatchKMeans is the paper's "on-line version of k-means"; faiss is the fast one at scale and uses
the GPU when the installed faiss has GPUs (``pip install 'specdistill[gpu]'`` brings faiss-gpu).
Where faiss cannot do what was asked (not installed; CPU-only faiss on a machine with a GPU) one
line says so and names the install that fixes it. Every backend is deterministic for a seed: the
same points, k and seed give the same labels.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from specdistill.errors import SpecdistillError
from specdistill.registry import Registry
from specdistill.threads import faiss_threads


@dataclass
class KMeansResult:
    labels: np.ndarray      # [num_points] int64 cluster of each point
    inertia: float          # sum of squared distances to the assigned centroid


SMALL_PROBLEM = 2**26          # points x dims x k below which k-means runs on one thread
KMeansFn = Callable[[np.ndarray, int, int, int, int], KMeansResult]
KMEANS_BACKENDS: Registry[KMeansFn] = Registry("k-means backend")


def run_kmeans(points: np.ndarray, k: int, *, backend: str = "faiss", seed: int = 0,
               n_init: int = 5, max_iter: int = 100) -> KMeansResult:
    """Cluster the rows of ``points`` into ``k`` groups with the named backend."""
    if not 1 <= k <= len(points):
        raise SpecdistillError(f"k={k} must be between 1 and the number of classes ({len(points)}); "
                               "choose a smaller --k")
    points = np.ascontiguousarray(points, dtype=np.float32)
    if backend == "faiss" and not faiss_installed():
        print("clustering: faiss is not installed, so k-means runs with scikit-learn (same groups, slower at "
              "large K); pip install 'specdistill[cpu]' (or '[gpu]' on a CUDA machine) for faiss", file=sys.stderr)
        backend = "sklearn"
    backend_fn = KMEANS_BACKENDS.get(backend)
    # a small problem on one thread: each of the hundreds of Lloyd steps would otherwise wait for
    # the other cores (seconds, not milliseconds, on a busy shared machine)
    small = points.size * k < SMALL_PROBLEM
    with threadpool_limits(1 if small else None), faiss_threads(1 if small and backend == "faiss" else None):
        result = backend_fn(points, k, seed, n_init, max_iter)
    result.labels = np.asarray(result.labels, dtype=np.int64)
    return result


def faiss_installed() -> bool:
    return importlib.util.find_spec("faiss") is not None


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


@KMEANS_BACKENDS.register("sklearn")
def _sklearn(points: np.ndarray, k: int, seed: int, n_init: int, max_iter: int) -> KMeansResult:
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed)
    labels = model.fit_predict(points)
    return KMeansResult(labels, float(model.inertia_))


@KMEANS_BACKENDS.register("minibatch")
def _minibatch(points: np.ndarray, k: int, seed: int, n_init: int, max_iter: int) -> KMeansResult:
    from sklearn.cluster import MiniBatchKMeans

    # batches of a few points per centroid; the final assignment is exact (predict on all points)
    batch = int(min(len(points), max(1024, 4 * k)))
    model = MiniBatchKMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, batch_size=batch,
                            random_state=seed, max_no_improvement=20)
    model.fit(points)
    labels = model.predict(points)
    inertia = float(((points - model.cluster_centers_[labels]) ** 2).sum())
    return KMeansResult(labels, inertia)


@KMEANS_BACKENDS.register("faiss")
def _faiss(points: np.ndarray, k: int, seed: int, n_init: int, max_iter: int) -> KMeansResult:
    import faiss
    from sklearn.cluster import kmeans_plusplus

    use_gpu = faiss.get_num_gpus() > 0
    if not use_gpu and _cuda_visible():
        print("clustering: this faiss has no GPU support, so k-means runs on the CPU; for the GPU index: "
              "pip uninstall faiss-cpu && pip install 'specdistill[gpu]'", file=sys.stderr)
    best: KMeansResult | None = None
    for restart in range(n_init):
        # faiss starts from random points; k-means++ seeds (scikit-learn's) reach the same quality
        # as sklearn.KMeans on planted groups, where random starts lose ~0.05 ARI
        # (one BLAS thread: k-means++ is k small products, where thread hand-offs cost more than
        # they save, 7x on a busy 2-core machine)
        with threadpool_limits(1):
            init, _ = kmeans_plusplus(points, k, random_state=seed + restart)
        # min_points_per_centroid=1 silences faiss's "too few points" warning (k-means over K
        # classes has few points per centroid); max_points_per_centroid keeps every point
        model = faiss.Kmeans(points.shape[1], k, niter=max_iter, seed=seed + restart, gpu=use_gpu,
                             verbose=False, min_points_per_centroid=1,
                             max_points_per_centroid=max(256, len(points) // k + 1))
        model.train(points, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        distances, labels = model.index.search(points, 1)
        result = KMeansResult(labels.ravel(), float(distances.sum()))
        if best is None or result.inertia < best.inertia:
            best = result
    return best
