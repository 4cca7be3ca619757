"""Read and check the generalist's held-out predictions: probabilities or log-probabilities, dense
``.npy`` ([N, K]), a scipy CSR ``.npz`` holding each row's top-k probabilities, or the generalist's
own top-k form (``preds-val-topk.npz``, :mod:`specdistill.predictions`).

Everything is checked before the stage writes anything, so bad input costs one clear line and leaves
the run directory as it was. A dense file is read in row chunks from a memory map, which is what lets
``--top-k`` keep a JFT-size prediction file (200,000 x 15,000 floats = 12 GB) out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from specdistill.artifacts import read_npy
from specdistill.errors import SpecdistillError
from specdistill.predictions import StoredPredictions

ROW_SUM_TOLERANCE = 1e-3        # float32 softmax rows over 15,000 classes sum to one within ~1e-5
_CHUNK_BYTES = 128 * 2**20


@dataclass
class Predictions:
    probs: np.ndarray | sp.csr_matrix   # [N, K] float32 probabilities (dense, or CSR of the top-k)
    source: str                         # where they came from, for clusters.json
    was_log: bool                       # the input held log-probabilities

    @property
    def num_examples(self) -> int:
        return int(self.probs.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.probs.shape[1])


def load_predictions(path: str | Path, top_k: int | None = None, progress: bool = True) -> Predictions:
    """Load and check a predictions file; ``top_k`` keeps only each row's k largest probabilities."""
    path = Path(path)
    if not path.exists():
        raise SpecdistillError(f"predictions file {path} not found; pass an existing .npy or .npz file")
    if is_topk_store(path):   # the generalist's top-k form (large K): its top probabilities as CSR
        store = StoredPredictions.read_topk(path)
        return Predictions(check_sparse(store.sparse_probs(top_k), str(path)), str(path), True)
    if path.suffix == ".npz":
        try:
            matrix = sp.load_npz(path)
        except (ValueError, OSError, KeyError) as exc:
            raise SpecdistillError(f"{path} is not a scipy sparse .npz ({exc}); save top-k probabilities "
                                   "with scipy.sparse.save_npz, or pass a dense .npy") from None
        return Predictions(check_sparse(matrix, str(path), top_k), str(path), False)
    array = read_npy(path, mmap=True)
    probs, was_log = check_dense(array, str(path), top_k, progress)
    return Predictions(probs, str(path), was_log)


def soften(probs: np.ndarray | sp.csr_matrix, temperature: float) -> np.ndarray | sp.csr_matrix:
    """Each row raised to ``1 / temperature`` and renormalised: the softmax of the logits divided by the
    temperature (paper section 2), which lifts a sharp generalist's second choices. A top-k (CSR) row is
    renormalised over its stored entries; the mass beyond them was already dropped."""
    if temperature == 1.0:
        return probs
    if sp.issparse(probs):
        out = probs.copy()
        out.data = np.power(out.data, 1.0 / temperature, dtype=np.float32)
        sums = np.asarray(out.sum(axis=1), dtype=np.float32).ravel()
        out.data /= np.repeat(np.maximum(sums, np.finfo(np.float32).tiny), np.diff(out.indptr))
        return out
    out = np.empty_like(probs, dtype=np.float32)
    for rows in _row_chunks_of(probs.shape):
        block = np.power(probs[rows], 1.0 / temperature, dtype=np.float32)
        out[rows] = block / block.sum(axis=1, keepdims=True)
    return out


def _row_chunks_of(shape: tuple) -> list[slice]:
    n, k = shape
    rows_per_chunk = max(1, _CHUNK_BYTES // (k * 4))
    return [slice(s, min(s + rows_per_chunk, n)) for s in range(0, n, rows_per_chunk)]


def is_topk_store(path: str | Path) -> bool:
    """A top-k predictions file of ``specdistill.predictions`` (not a scipy sparse .npz)."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {"log_probs", "indices", "residual", "num_classes"} <= set(stored.files)
    except (ValueError, OSError, EOFError):
        return False


def check_dense(array: np.ndarray, name: str, top_k: int | None = None,
                progress: bool = True) -> tuple[np.ndarray | sp.csr_matrix, bool]:
    """Validate an [N, K] array of probabilities or log-probabilities (which is detected) and return
    float32 probabilities: dense, or CSR of each row's ``top_k`` largest when ``top_k < K``."""
    _check_shape(array.shape, name)
    if not np.issubdtype(array.dtype, np.floating):
        raise SpecdistillError(f"{name} holds {array.dtype} values; expected floating-point "
                               "probabilities or log-probabilities")
    n, k = array.shape
    chunks = _row_chunks_of(array.shape)
    # pass 1: decide probabilities vs log-probabilities from the value range
    lowest, highest = np.inf, -np.inf
    for rows in chunks:
        block = np.asarray(array[rows])
        bad = np.isnan(block) | (block == np.inf)
        if bad.any():
            row = rows.start + int(np.argwhere(bad)[0][0])
            raise SpecdistillError(f"{name} has NaN or inf (first in row {row}); the generalist's outputs "
                                   "are broken: retrain it or fix the file")
        finite = block[np.isfinite(block)]
        if finite.size:
            lowest, highest = min(lowest, float(finite.min())), max(highest, float(finite.max()))
        if np.isneginf(block).any():
            lowest = -np.inf
    was_log = lowest < 0
    if was_log and highest > ROW_SUM_TOLERANCE:
        raise SpecdistillError(f"{name} mixes negative values with values up to {highest:.3g}: neither "
                               "probabilities (in [0, 1]) nor log-probabilities (<= 0); pass one of them")
    if not was_log and highest > 1 + ROW_SUM_TOLERANCE:
        raise SpecdistillError(f"{name} has values up to {highest:.3g}, so they are not probabilities; "
                               "pass softmax outputs (or log-softmax), not logits")
    # pass 2: convert, check row sums, keep dense or top-k
    keep_top = top_k is not None and top_k < k
    dense = None if keep_top else np.empty((n, k), dtype=np.float32)
    cols, vals = [], []
    for rows in tqdm(chunks, desc="read predictions", disable=not progress or len(chunks) < 4, leave=False):
        block = np.asarray(array[rows], dtype=np.float32)
        if was_log:
            block = np.exp(block)
        _check_row_sums(block.sum(axis=1, dtype=np.float64), rows.start, name, exact=True)
        if keep_top:
            top = np.argpartition(-block, top_k - 1, axis=1)[:, :top_k]
            cols.append(top)
            vals.append(np.take_along_axis(block, top, axis=1))
        else:
            dense[rows] = block
    if not keep_top:
        return dense, was_log
    cols_all, vals_all = np.concatenate(cols), np.concatenate(vals)
    indptr = np.arange(0, n * top_k + 1, top_k)
    matrix = sp.csr_matrix((vals_all.ravel(), cols_all.ravel(), indptr), shape=(n, k))
    matrix.sort_indices()
    return matrix, was_log


def check_sparse(matrix: sp.spmatrix, name: str, top_k: int | None = None) -> sp.csr_matrix:
    """Validate a sparse store of probabilities (each row's largest ones, so a row sums to at most
    one) and return it as float32 CSR, cut to each row's ``top_k`` largest if asked."""
    _check_shape(matrix.shape, name)
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    matrix.sum_duplicates()
    data = matrix.data
    if not np.isfinite(data).all():
        row = int(np.searchsorted(matrix.indptr, np.flatnonzero(~np.isfinite(data))[0], side="right") - 1)
        raise SpecdistillError(f"{name} has NaN or inf (first in row {row}); fix the file")
    if data.size and (data.min() < 0 or data.max() > 1 + ROW_SUM_TOLERANCE):
        raise SpecdistillError(f"{name}: a sparse predictions file must hold probabilities in [0, 1] "
                               f"(found values in [{data.min():.3g}, {data.max():.3g}])")
    _check_row_sums(np.asarray(matrix.sum(axis=1)).ravel(), 0, name, exact=False)
    if top_k is not None and matrix.getnnz(axis=1).max(initial=0) > top_k:
        matrix = _row_top_k(matrix, top_k)
    return matrix


def _check_shape(shape: tuple, name: str) -> None:
    if len(shape) != 2:
        raise SpecdistillError(f"{name} has shape {tuple(shape)}; expected [N, K]: one row per held-out "
                               "example, one column per class")
    n, k = shape
    if n < 2 or k < 2:
        raise SpecdistillError(f"{name} has shape {tuple(shape)}; a covariance needs at least 2 rows "
                               "(examples) and 2 columns (classes)")


def _check_row_sums(sums: np.ndarray, offset: int, name: str, exact: bool) -> None:
    bad = np.abs(sums - 1.0) > ROW_SUM_TOLERANCE if exact else (sums > 1 + ROW_SUM_TOLERANCE) | (sums <= 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        want = "sum to one" if exact else "sum to at most one (and more than zero)"
        raise SpecdistillError(f"row {offset + row} of {name} sums to {sums[row]:.4g}; each row must {want} "
                               "(pass softmax probabilities or log-softmax outputs, not logits)")


def _row_top_k(matrix: sp.csr_matrix, top_k: int) -> sp.csr_matrix:
    """Keep each row's ``top_k`` largest entries, vectorised over all stored entries."""
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    order = np.lexsort((-matrix.data, rows))
    rank = np.arange(order.size) - matrix.indptr[rows[order]]
    keep = np.sort(order[rank < top_k])
    kept = sp.csr_matrix((matrix.data[keep], (rows[keep], matrix.indices[keep])), shape=matrix.shape)
    kept.sort_indices()
    return kept
