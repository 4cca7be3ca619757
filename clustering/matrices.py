"""The K x K matrix whose columns k-means clusters: the covariance of the predictions, or a variant.

Paper section 5.3 clusters the columns of the covariance C of the generalist's predicted
probabilities. C[j, j] (class j's own variance) grows with how often and how confidently class j is
predicted, so in plain covariance a frequent class's column is long and far from every other column,
whatever it is confused with. The variants remove that, and combine with "+":

``covariance``   C itself (the paper's)
``correlation``  D^-1/2 C D^-1/2 with D = diag(C): every class's variance becomes 1
``offdiag``      the diagonal set to zero: a class is described only by what it is confused with
``normalized``   every column scaled to unit length: k-means then compares directions (cosine)

e.g. ``correlation+offdiag+normalized`` describes class j by the direction of its correlations with
every other class. ``benchmarks/bench_clustering.py matrices`` measures which recovers planted
groups best (see ``benchmarks/results/clustering.md``).

Every variant is ``M = diag(a) (C - z diag(C)) diag(b)``, and C = X^T X / N - mu mu^T, so ``M @ B`` costs
two products with X and never forms C: that is what lets the sketch path (``sketch.py``) handle
K = 15,000 classes. ``dense()`` builds M exactly for the small-K path.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

MATRIX_KINDS = ("covariance", "correlation", "offdiag", "normalized", "correlation+offdiag",
                "correlation+normalized", "offdiag+normalized", "correlation+offdiag+normalized")
DEFAULT_MATRIX = "correlation+offdiag+normalized"   # the winner in benchmarks/results/clustering.md

_DENSE_CHUNK_BYTES = 64 * 2**20   # rows of a dense X processed at a time in X^T X


class PredictionMatrix:
    """M for one matrix kind, over predictions X ([N, K] dense array or CSR of probabilities).

    ``a``/``b``/``z`` are the row scale, column scale and diagonal weight of the module docstring's
    formula. For ``normalized`` kinds the column norms are exact when ``dense()`` runs; the sketch
    path takes them from the sketch instead (``points_sketch``), accurate to ~sqrt(2/d).
    """

    def __init__(self, probs: np.ndarray | sp.csr_matrix, kind: str) -> None:
        if kind not in MATRIX_KINDS:
            raise ValueError(f"unknown matrix {kind!r}; choose one of {MATRIX_KINDS}")
        self.x = probs
        self.kind = kind
        self.num_examples, self.num_classes = probs.shape
        n = self.num_examples
        if sp.issparse(probs):
            self.mu = np.asarray(probs.mean(axis=0), dtype=np.float64).ravel()
            second = np.asarray(probs.multiply(probs).sum(axis=0), dtype=np.float64).ravel() / n
        else:
            self.mu = probs.mean(axis=0, dtype=np.float64)
            second = np.einsum("ij,ij->j", probs, probs, dtype=np.float64) / n
        self.variance = np.maximum(second - self.mu**2, 0.0)   # diag(C)
        tokens = set(kind.split("+"))
        self.normalized = "normalized" in tokens
        self.a = np.ones(self.num_classes)
        self.z = 1.0 if "offdiag" in tokens else 0.0
        if "correlation" in tokens:
            self.a = _safe_inverse(np.sqrt(self.variance))
        self.b = self.a.copy()      # normalized: replaced by 1 / column norms (dense() or sketch)
        self._dense: np.ndarray | None = None

    @property
    def symmetric(self) -> bool:
        return not self.normalized

    # ------------------------------------------------------------------ products with C and M

    def cov_matmul(self, B: np.ndarray) -> np.ndarray:
        """C @ B = X^T (X B) / N - mu (mu^T B), without forming C."""
        B = np.asarray(B, dtype=np.float32)
        if sp.issparse(self.x):
            xtxb = np.asarray(self.x.T @ (self.x @ B), dtype=np.float64)
        else:
            xtxb = np.zeros((self.num_classes, B.shape[1]))
            for rows in _row_chunks(self.x):
                block = self.x[rows]
                xtxb += block.T @ (block @ B)
        return xtxb / self.num_examples - np.outer(self.mu, self.mu @ B)

    def matmul(self, B: np.ndarray) -> np.ndarray:
        """M @ B (float64); uses the dense M when it was already built."""
        if self._dense is not None:
            return self._dense @ B
        B = np.asarray(B, dtype=np.float64)
        scaled = self.b[:, None] * B
        out = self.cov_matmul(scaled)
        if self.z:
            out -= self.z * self.variance[:, None] * scaled
        return self.a[:, None] * out

    def rmatmul(self, B: np.ndarray) -> np.ndarray:
        """M^T @ B: row j is column j of M projected on B (k-means points in a sketch)."""
        if self.symmetric:
            return self.matmul(B)
        if self._dense is not None:
            return self._dense.T @ B
        B = np.asarray(B, dtype=np.float64)
        scaled = self.a[:, None] * B
        out = self.cov_matmul(scaled)
        if self.z:
            out -= self.z * self.variance[:, None] * scaled
        return self.b[:, None] * out

    def columns(self, index: np.ndarray) -> np.ndarray:
        """M[:, index] exactly (for pictures and small checks), via M @ E_index."""
        index = np.asarray(index, dtype=np.int64)
        if self._dense is not None:
            return self._dense[:, index]
        selector = np.zeros((self.num_classes, len(index)))
        selector[index, np.arange(len(index))] = 1.0
        return self.matmul(selector)

    # ------------------------------------------------------------------ the exact dense path

    def covariance_dense(self, progress: bool = True) -> np.ndarray:
        """C as a dense float64 [K, K] array: O(N K^2) time, K^2 memory."""
        n = self.num_examples
        if sp.issparse(self.x):
            xtx = (self.x.T @ self.x).toarray().astype(np.float64)
        else:
            xtx = np.zeros((self.num_classes, self.num_classes))
            chunks = list(_row_chunks(self.x))
            for rows in tqdm(chunks, desc="covariance", disable=not progress or len(chunks) < 4,
                             leave=False):
                block = np.asarray(self.x[rows], dtype=np.float32)
                xtx += block.T @ block
        return xtx / n - np.outer(self.mu, self.mu)

    def dense(self, progress: bool = True) -> np.ndarray:
        """M as a dense float64 [K, K] array (cached, so later products reuse it)."""
        if self._dense is None:
            m = self.covariance_dense(progress)
            if self.z:    # exactly zero: X^T X's float32 diagonal differs from the variance by ~1e-7
                m[np.diag_indices_from(m)] = 0.0
            m *= self.a[:, None]
            if self.normalized:
                self.b = _safe_inverse(np.linalg.norm(m, axis=0))
            m *= self.b[None, :]
            self._dense = m
        return self._dense

    def points_sketch(self, omega: np.ndarray) -> np.ndarray:
        """Row j is Omega^T M[:, j]: column j of M projected to Omega's few dimensions (float32).

        With Omega Gaussian / sqrt(d) the distances between rows approximate those between
        columns of M (Johnson-Lindenstrauss). For ``normalized`` kinds the unit-length scaling is
        applied to the sketched column, i.e. with the column norms the sketch estimates.
        """
        if self.normalized:
            self.b = np.ones(self.num_classes)
            raw = self.rmatmul(omega)                     # Omega^T of the unscaled columns
            self.b = _safe_inverse(np.linalg.norm(raw, axis=1))
            points = raw * self.b[:, None]
        else:
            points = self.matmul(omega)
        return np.ascontiguousarray(points, dtype=np.float32)

    def points_dense(self, progress: bool = True) -> np.ndarray:
        """The k-means points: row j is column j of M (float32, [K, K])."""
        m = self.dense(progress)
        return np.ascontiguousarray((m if self.symmetric else m.T), dtype=np.float32)


def _safe_inverse(values: np.ndarray) -> np.ndarray:
    """1/v where v > 0, else 0: a class that is never predicted has an all-zero column."""
    values = np.asarray(values, dtype=np.float64)
    tiny = np.finfo(np.float64).tiny
    return np.where(values > tiny, 1.0 / np.maximum(values, tiny), 0.0)


def _row_chunks(x: np.ndarray):
    rows = max(1, _DENSE_CHUNK_BYTES // max(1, x.shape[1] * 4))
    for start in range(0, x.shape[0], rows):
        yield slice(start, min(start + rows, x.shape[0]))
