"""A stored prediction file: the log-probabilities a model gave on a split, dense where small, top-k
where large.

Why two forms: a dense [N, K] float32 file grows with N x K (200,000 held-out images x 15,000
classes is 12 GB), while what the later stages read from it is each row's few largest classes. So

* ``dense`` (``preds-<split>.npy``): float32 [N, K] log-probabilities, exactly as before: kept where
  it is small (below ``generalist.dense_predictions_limit_mb``), since it loses nothing;
* ``topk`` (``preds-<split>-topk.npz``): per row the ``top_k`` largest log-probabilities
  (float32 [N, k], descending) with their class ids (int32 [N, k]) and the probability mass of every
  other class (``residual``, float32 [N]), plus ``num_classes``. Its size grows with N x k. Expanding
  a row spreads the residual evenly over the K - k other classes, as the student's teacher cache
  does (``student/cache.py``): exact on the classes that matter, and each row still sums to one.

Written from batches of log-probabilities (the model's forward in batches, :func:`write_predictions`),
so storing top-k never holds a full [N, K] array; read back as :class:`StoredPredictions`, which
gives dense blocks, the top entries, a sparse matrix of probabilities (clustering) or the whole
dense array where that is small. Paths come from :class:`specdistill.rundir.RunDir` only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdistill.artifacts import atomic_path, read_npy, write_npy
from specdistill.errors import SpecdistillError
from specdistill.hashing import digest_arrays
from specdistill.rundir import RunDir

FORMS = ("dense", "topk")
_BLOCK_BYTES = 64 * 2**20      # dense blocks handed out by StoredPredictions.blocks


def dense_bytes(num_examples: int, num_classes: int) -> int:
    return 4 * int(num_examples) * int(num_classes)


def block_rows(num_classes: int) -> int:
    """Rows of a dense float32 block of about ``_BLOCK_BYTES`` at ``num_classes`` columns."""
    return max(1, _BLOCK_BYTES // max(1, 4 * num_classes))


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), ``None`` where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def choose_form(gcfg: Any, splits: dict[str, int], num_classes: int) -> str:
    """``dense`` or ``topk`` for a model's stored predictions (``gcfg``: the generalist section;
    ``splits``: examples per split), before any work.

    ``auto`` stores dense while the largest split's dense file stays within
    ``dense_predictions_limit_mb``, else top-k. An explicit ``dense`` beyond the limit (or beyond the
    memory available) is refused with one line giving the size and the option that avoids it.
    """
    n = max(splits.values(), default=0)
    size = dense_bytes(n, num_classes)
    limit = gcfg.dense_predictions_limit_mb * 2**20
    if gcfg.predictions == "topk" or (gcfg.predictions == "auto" and size > limit):
        if gcfg.predictions_top_k >= num_classes:
            return "dense"   # top-k of every class is the dense form, and smaller
        return "topk"
    if gcfg.predictions == "dense":
        memory = available_memory()
        if size > limit or (memory is not None and size > memory):
            why = (f"over generalist.dense_predictions_limit_mb={gcfg.dense_predictions_limit_mb:g}"
                   if size > limit else f"more than the {_size(memory)} of memory available")
            raise SpecdistillError(
                f"generalist.predictions=dense would store {_size(size)} per split ([{n:,}, {num_classes:,}] "
                f"float32 log-probabilities), {why}; set generalist.predictions=topk (or auto) to store each "
                f"row's top {gcfg.predictions_top_k} and the residual mass ({_size(8 * n * gcfg.predictions_top_k)})")
    return "dense"


# ---------------------------------------------------------------------------------------------- writing


def _top(block: torch.Tensor, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block's ``top_k`` log-probabilities (descending), their ids and the mass of the other classes."""
    values, indices = torch.topk(block, top_k, dim=1)
    rest = block.scatter(1, indices, float("-inf"))
    residual = torch.logsumexp(rest.double(), dim=1).exp()   # in log space: exact when it is tiny
    return values.float().numpy(), indices.to(torch.int32).numpy(), residual.float().numpy()


class PredictionWriter:
    """A split's predictions written from [b, K] log-probability blocks handed in order (:meth:`add`),
    then :meth:`close`: dense (chosen only where small) is assembled and saved with ``np.save``, the
    same bytes as ever; top-k keeps each block's top entries only, never [N, K]. Nothing is on disk
    before :meth:`close`, which also removes the other form's file, so a folder holds one."""

    def __init__(self, folder: str | os.PathLike, split: str, num_examples: int, num_classes: int, form: str,
                 top_k: int) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.folder, self.split, self.form, self.top_k = Path(folder), split, form, top_k
        self.num_examples, self.num_classes = num_examples, num_classes
        self.written = 0
        self._dense = np.empty((num_examples, num_classes), dtype=np.float32) if form == "dense" else None
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, block: np.ndarray | torch.Tensor) -> None:
        _check_rows(self.written + len(block), self.num_examples, self.split, more_ok=True)
        if self._dense is not None:
            self._dense[self.written:self.written + len(block)] = np.asarray(block, dtype=np.float32)
        else:
            self._parts.append(_top(torch.as_tensor(block, dtype=torch.float32), self.top_k))
        self.written += len(block)

    def close(self) -> StoredPredictions:
        _check_rows(self.written, self.num_examples, self.split)
        dense_path, topk_path = RunDir.preds_in(self.folder, self.split), RunDir.topk_preds_in(self.folder, self.split)
        if self._dense is not None:
            write_npy(dense_path, self._dense)
            topk_path.unlink(missing_ok=True)
        else:
            k = self.top_k
            log_probs, indices, residual = (np.concatenate([p[i] for p in self._parts]) if self._parts else empty
                                            for i, empty in enumerate((np.zeros((0, k), np.float32),
                                                                       np.zeros((0, k), np.int32),
                                                                       np.zeros(0, np.float32))))
            with atomic_path(topk_path) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, log_probs=log_probs, indices=indices, residual=residual,
                             num_classes=np.int64(self.num_classes))
            dense_path.unlink(missing_ok=True)
        self._dense, self._parts = None, []
        return StoredPredictions.open(self.folder, self.split)


def write_predictions(folder: str | os.PathLike, split: str, batches: Iterable[np.ndarray | torch.Tensor],
                      num_examples: int, num_classes: int, form: str, top_k: int) -> StoredPredictions:
    """Write a split's predictions from ``batches`` of [b, K] log-probabilities, in order
    (:class:`PredictionWriter`)."""
    writer = PredictionWriter(folder, split, num_examples, num_classes, form, top_k)
    for block in batches:
        writer.add(block)
    return writer.close()


def _check_rows(written: int, num_examples: int, split: str, more_ok: bool = False) -> None:
    if written > num_examples or (written < num_examples and not more_ok):
        raise SpecdistillError(f"{split} predictions: {written} rows for {num_examples} examples")


def model_batches(model: torch.nn.Module, images: Any, batch_size: int,
                  device: torch.device | str) -> Iterator[torch.Tensor]:
    """The model's log-probabilities a batch at a time: never a full [N, K] array in memory."""
    from specdistill.engine import predict_logits

    for start in range(0, len(images), batch_size):
        logits = predict_logits(model, images[start:start + batch_size], batch_size, device)
        yield torch.log_softmax(logits, dim=1)


# ---------------------------------------------------------------------------------------------- reading


class StoredPredictions:
    """One stored split: ``form`` is ``dense`` (``array``, [N, K], memory-mapped) or ``topk``."""

    def __init__(self, path: Path, form: str, num_examples: int, num_classes: int,
                 array: np.ndarray | None = None, top: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None):
        self.path, self.form = path, form
        self.num_examples, self.num_classes = num_examples, num_classes
        self._array, self._top = array, top

    @classmethod
    def open(cls, folder: str | os.PathLike, split: str) -> StoredPredictions:
        """The predictions a model folder (the generalist's) holds for ``split``, in whichever form."""
        folder = Path(folder)
        dense_path, topk_path = RunDir.preds_in(folder, split), RunDir.topk_preds_in(folder, split)
        if topk_path.exists() and not dense_path.exists():
            return cls.read_topk(topk_path)
        if not dense_path.exists():
            raise SpecdistillError(f"missing file {dense_path} (nor {topk_path.name}); run the stage that "
                                   "writes it first")
        return cls.read_dense(dense_path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> StoredPredictions:
        """One stored predictions file of either form: ``.npy`` (dense) or ``.npz`` (top-k)."""
        path = Path(path)
        if path.suffix == ".npz":
            return cls.read_topk(path)
        if path.suffix == ".npy":
            return cls.read_dense(path)
        raise SpecdistillError(f"{path} is not a predictions file; expected .npy (dense) or .npz (top-k)")

    @classmethod
    def read_dense(cls, path: str | os.PathLike) -> StoredPredictions:
        path = Path(path)
        array = read_npy(path, mmap=True)
        if array.ndim != 2:
            raise SpecdistillError(f"{path} has shape {array.shape}; expected [N, K]: rerun its stage")
        return cls(path, "dense", array.shape[0], array.shape[1], array=array)

    @classmethod
    def read_topk(cls, path: str | os.PathLike) -> StoredPredictions:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as stored:
                log_probs, indices = stored["log_probs"], stored["indices"]
                residual, num_classes = stored["residual"], int(stored["num_classes"])
        except (ValueError, OSError, KeyError, EOFError) as exc:
            raise SpecdistillError(f"{path} is not a top-k predictions file ({exc}); delete it and rerun "
                                   "its stage") from None
        n = len(residual)
        if log_probs.shape != indices.shape or log_probs.ndim != 2 or len(log_probs) != n or (
                indices.size and (indices.min() < 0 or indices.max() >= num_classes)):
            raise SpecdistillError(f"{path} is damaged (arrays {log_probs.shape}, {indices.shape}, {residual.shape} "
                                   f"for {num_classes} classes); delete it and rerun its stage")
        return cls(path, "topk", n, num_classes, top=(log_probs, indices, residual))

    @property
    def top_k(self) -> int | None:
        return None if self._top is None else self._top[0].shape[1]

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    def content_digest(self) -> str:
        """The predictions themselves, not the file's bytes (a zip entry carries a timestamp)."""
        if self.form == "dense":
            return digest_arrays(np.asarray(self._array))
        return digest_arrays(*self._top, np.int64(self.num_classes))

    def _expand(self, rows: slice) -> np.ndarray:
        log_probs, indices, residual = (a[rows] for a in self._top)
        others = max(self.num_classes - log_probs.shape[1], 1)
        with np.errstate(divide="ignore"):
            fill = np.log(residual.astype(np.float64) / others).astype(np.float32)
        block = np.repeat(fill[:, None], self.num_classes, axis=1)
        np.put_along_axis(block, indices.astype(np.int64), log_probs, axis=1)
        return block

    def blocks(self, rows_per_block: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """Dense float32 [b, K] log-probability blocks over all rows (top-k rows expanded)."""
        rows_per_block = rows_per_block or block_rows(self.num_classes)
        for start in range(0, self.num_examples, rows_per_block):
            rows = slice(start, min(start + rows_per_block, self.num_examples))
            yield rows, (np.array(self._array[rows], dtype=np.float32) if self.form == "dense"
                         else self._expand(rows))

    def dense(self, limit_bytes: int | None = None) -> np.ndarray:
        """The whole [N, K] array (top-k rows expanded); refused beyond ``limit_bytes``."""
        size = dense_bytes(self.num_examples, self.num_classes)
        if limit_bytes is not None and size > limit_bytes:
            raise SpecdistillError(f"{self.path} would take {_size(size)} as a dense array, over the "
                                   f"{_size(limit_bytes)} allowed; read it in blocks")
        if self.form == "dense":
            return np.array(self._array)
        return self._expand(slice(0, self.num_examples))

    def top(self, k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's ``k`` largest log-probabilities (descending), their class ids and the other mass."""
        if self.form == "topk":
            if k is None or k >= self.top_k:
                return self._top
            log_probs, indices, residual = self._top
            rest = np.exp(log_probs[:, k:].astype(np.float64)).sum(1)
            return log_probs[:, :k], indices[:, :k], (residual + rest).astype(np.float32)
        k = min(k or self.num_classes, self.num_classes)
        parts = [_top(torch.as_tensor(block), k) for _, block in self.blocks()]
        if not parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32), np.zeros(0, np.float32)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))

    def argmax(self) -> np.ndarray:
        if self.form == "topk":
            return self._top[1][:, 0].astype(np.int64)
        return np.concatenate([block.argmax(1) for _, block in self.blocks()]) if self.num_examples else \
            np.zeros(0, np.int64)

    def sparse_probs(self, k: int | None = None):
        """A scipy CSR [N, K] of each row's top probabilities (``k`` of them; all stored by default)."""
        import scipy.sparse as sp

        log_probs, indices, _ = self.top(k)
        n, width = log_probs.shape
        matrix = sp.csr_matrix((np.exp(log_probs).ravel(), indices.ravel(), np.arange(0, n * width + 1, width)),
                               shape=(n, self.num_classes), dtype=np.float32)
        matrix.sort_indices()
        return matrix
