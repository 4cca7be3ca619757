"""The models' outputs on one split, read back a chunk of rows at a time: what bounds combine's memory.

Every combine step (calibration, gating, the evaluation of each system) reads the generalist's full
distribution and the active specialists' outputs, row by row. A split's generalist rows are [N, K]
(30,000 held-out images x 15,000 classes is 1.8 GB of float32), and each system the report compares
is another [N, K]. So :class:`SplitOutputs` keeps

* the generalist's log-probabilities whole only while they fit ``combine.memory_limit_mb``; beyond
  it, each row's top classes (what activates the specialists) are kept and the generalist runs again
  on a chunk of rows whenever a step reads it (same chunks, same batches: the same numbers);
* each specialist's output only on the rows where some compared top-n may activate it,
  [n_m, |S_m| + 1], uncalibrated;

and :meth:`SplitOutputs.chunks` hands out [rows, K] blocks (``chunk_rows`` of them, ~64 MiB of
float32 each) with the ensemble's calibration applied. Memory then grows with the chunk x K and
with the specialists' active rows, never with N x K.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from combine.activation import membership_matrix
from combine.calibration import Calibration, apply_temperature
from specdistill.data import take
from specdistill.engine import predict_logits
from specdistill.errors import SpecdistillError

CHUNK_BYTES = 64 * 2**20   # one [rows, K] float32 block


def chunk_rows_for(num_classes: int) -> int:
    return int(max(16, min(4096, CHUNK_BYTES // (4 * max(1, num_classes)))))


@dataclass
class Chunk:
    """Rows ``lo:hi`` of a split: calibrated generalist [r, K], each specialist's [r, |S_m|+1] (rows it
    skips are zeros and never read), labels [r], and the rows' top classes (for the top-n rule)."""

    lo: int
    hi: int
    gen: torch.Tensor
    specs: list[torch.Tensor]
    labels: torch.Tensor
    top1: torch.Tensor          # [r] the generalist's argmax (torch.max's tie-breaking, as combine.activation)
    top: torch.Tensor           # [r, n] its n best classes (torch.topk's), n = the largest top-n compared

    def active(self, membership: torch.Tensor, top_n: int) -> torch.Tensor:
        """[r, M] the paper's rule, from the stored top classes (never from recomputed values)."""
        return top_n_rule(self.top1, self.top, membership, top_n)


def top_n_rule(top1: torch.Tensor, top: torch.Tensor, membership: torch.Tensor, top_n: int) -> torch.Tensor:
    """[r, M] specialist m is active where its group holds one of the row's ``top_n`` classes."""
    return membership[top1[:, None] if top_n == 1 else top[:, :top_n]].any(dim=1)


class SplitOutputs:
    """One split's generalist and specialist outputs (see the module docstring)."""

    def __init__(self, num_classes: int, groups: Sequence[torch.Tensor], labels: np.ndarray | torch.Tensor,
                 top1: torch.Tensor, top: torch.Tensor, spec_rows: list[torch.Tensor], spec_values: list[torch.Tensor],
                 gen_whole: torch.Tensor | None = None,
                 gen_rows: Callable[[int, int], torch.Tensor] | None = None, chunk_rows: int | None = None,
                 calibration: Calibration | None = None) -> None:
        if gen_whole is None and gen_rows is None:
            raise ValueError("SplitOutputs needs the generalist's rows whole or a way to compute them")
        self.num_classes = int(num_classes)
        self.groups = [torch.as_tensor(g, dtype=torch.int64) for g in groups]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.top1, self.top = top1, top
        self.spec_rows, self.spec_values = spec_rows, spec_values
        self._gen_whole, self._gen_rows = gen_whole, gen_rows
        self.chunk_rows = chunk_rows or chunk_rows_for(num_classes)
        self.calibration = calibration or Calibration.identity(len(self.groups))
        self.membership = membership_matrix(self.groups, self.num_classes)
        self.generalist_passes = 0     # how often the generalist ran again (0 when held whole)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def held_whole(self) -> bool:
        return self._gen_whole is not None

    @property
    def max_top_n(self) -> int:
        return int(self.top.shape[1])

    # ---- building
    @classmethod
    def from_arrays(cls, gen_log_probs, groups: Sequence, spec_log_probs: Sequence, labels,
                    top_ns: Sequence[int] = (1, 2, 3), chunk_rows: int | None = None) -> SplitOutputs:
        """Outputs a caller already holds (every specialist on every row), e.g. from their own models."""
        gen = torch.as_tensor(np.asarray(gen_log_probs)) if not isinstance(gen_log_probs, torch.Tensor) \
            else gen_log_probs
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if gen.dim() != 2 or labels.shape != (gen.shape[0],):
            raise SpecdistillError(f"labels have shape {tuple(labels.shape)} for predictions of shape "
                                   f"{tuple(gen.shape)}; pass one label per row")
        K = gen.shape[1]
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= K):
            raise SpecdistillError(f"labels must be class ids in 0..{K - 1}; "
                                   f"got {int(labels.min())}..{int(labels.max())}")
        top1, top = _top_classes(gen, max(top_ns))
        specs = [torch.as_tensor(np.asarray(s)) if not isinstance(s, torch.Tensor) else s for s in spec_log_probs]
        everything = torch.arange(len(labels))
        return cls(K, groups, labels, top1, top, [everything] * len(specs), specs, gen_whole=gen,
                   chunk_rows=chunk_rows)

    @classmethod
    def from_models(cls, ensemble, images, labels, top_ns: Sequence[int], limit_bytes: float,
                    timings: dict | None = None) -> SplitOutputs:
        """Run ``ensemble`` (:class:`combine.ensemble.Ensemble`, uncalibrated outputs) on a split: the
        generalist on every image a chunk at a time, then each specialist on the images where any of
        ``top_ns`` may activate it. ``timings`` gets ``generalist_s`` and ``specialists_s``."""
        n, K = len(labels), ensemble.num_classes
        chunk_rows = chunk_rows_for(K)
        hold = 4 * n * K <= limit_bytes

        def gen_rows(lo: int, hi: int) -> torch.Tensor:   # the same chunks every time: the same numbers
            return torch.log_softmax(predict_logits(ensemble.generalist, images[lo:hi], ensemble.batch_size,
                                                    ensemble.device), dim=1)

        began = time.perf_counter()
        whole = torch.empty(n, K) if hold else None
        top1 = torch.empty(n, dtype=torch.int64)
        top = torch.empty(n, max(top_ns), dtype=torch.int64)
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            block = gen_rows(lo, hi)
            if whole is not None:
                whole[lo:hi] = block
            top1[lo:hi], top[lo:hi] = _top_classes(block, max(top_ns))
        generalist_s = time.perf_counter() - began
        membership = membership_matrix(ensemble.groups, K)
        needed = torch.zeros(n, len(ensemble), dtype=torch.bool)
        for top_n in set(top_ns):
            needed |= top_n_rule(top1, top, membership, top_n)
        began = time.perf_counter()
        spec_rows, spec_values = [], []
        for m in range(len(ensemble)):
            rows = needed[:, m].nonzero().squeeze(1)
            spec_rows.append(rows)
            spec_values.append(ensemble.specialist_log_probs(m, take(images, rows.numpy()), calibrated=False)
                               if len(rows) else torch.zeros(0, len(ensemble.groups[m]) + 1))
        if timings is not None:
            timings.update(generalist_s=generalist_s, specialists_s=time.perf_counter() - began,
                           specialist_images=int(needed.sum()), num_specialists=len(ensemble),
                           generalist_held_whole=hold)
        return cls(K, ensemble.groups, labels, top1, top, spec_rows, spec_values, gen_whole=whole,
                   gen_rows=None if hold else gen_rows, chunk_rows=chunk_rows)

    # ---- reading
    def chunks(self, desc: str | None = None) -> Iterator[Chunk]:
        """Every row once, in order, in blocks of ``chunk_rows``; the calibration applied. ``desc``: a
        progress bar of that name (stderr)."""
        if not self.held_whole:
            self.generalist_passes += 1
        n = len(self)
        starts = range(0, n, self.chunk_rows)
        for lo in tqdm(starts, desc=desc, disable=desc is None or len(starts) < 2, leave=False, unit="chunk"):
            hi = min(n, lo + self.chunk_rows)
            raw = self._gen_whole[lo:hi] if self.held_whole else self._gen_rows(lo, hi)
            gen = apply_temperature(raw, self.calibration.generalist)
            specs = []
            for m, (rows, values) in enumerate(zip(self.spec_rows, self.spec_values)):
                a, b = (int(i) for i in torch.searchsorted(rows, torch.tensor([lo, hi])))
                part = apply_temperature(values[a:b], self.calibration.specialists[m])
                if len(rows) == n:    # run on every row (arrays a caller holds): rows a:b are lo:hi
                    specs.append(part)
                    continue
                block = torch.zeros(hi - lo, values.shape[1], dtype=values.dtype)
                block[rows[a:b] - lo] = part
                specs.append(block)
            yield Chunk(lo, hi, gen, specs, self.labels[lo:hi], self.top1[lo:hi], self.top[lo:hi])

    def active(self, top_n: int) -> torch.Tensor:
        """[N, M] the top-n rule over the whole split (N x M bools: small)."""
        return top_n_rule(self.top1, self.top, self.membership, top_n)

    def subset(self, rows: torch.Tensor | np.ndarray) -> SplitOutputs:
        """The outputs of some rows (sorted example ids), uncalibrated; nothing runs again. A generalist
        not held whole is computed, when a step reads the subset, on this split's own chunks that hold
        the rows asked for (one at a time: the same numbers, memory of one chunk)."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.int64)
        if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all()):
            raise ValueError("subset rows must be sorted and distinct")
        spec_rows, spec_values = [], []
        for ran, values in zip(self.spec_rows, self.spec_values):
            kept = torch.isin(ran, rows)
            spec_rows.append(torch.searchsorted(rows, ran[kept]))
            spec_values.append(values[kept])
        gen_rows = None
        if not self.held_whole:
            parent, size = self._gen_rows, self.chunk_rows

            def gen_rows(lo: int, hi: int) -> torch.Tensor:
                wanted, blocks = rows[lo:hi], []
                for start in torch.unique(wanted // size).tolist():
                    a = start * size
                    here = wanted[(wanted >= a) & (wanted < a + size)]
                    blocks.append(parent(a, min(len(self), a + size))[here - a])
                return torch.cat(blocks)

        return SplitOutputs(self.num_classes, self.groups, self.labels[rows], self.top1[rows], self.top[rows],
                            spec_rows, spec_values, gen_whole=self._gen_whole[rows] if self.held_whole else None,
                            gen_rows=gen_rows, chunk_rows=self.chunk_rows)

    def specialist_rows(self, m: int, rows: torch.Tensor) -> torch.Tensor:
        """Specialist m's uncalibrated outputs on ``rows`` (sorted example ids it was run on)."""
        where = torch.searchsorted(self.spec_rows[m], rows)
        if len(rows) and not bool((self.spec_rows[m][where.clamp(max=len(self.spec_rows[m]) - 1)] == rows).all()):
            raise SpecdistillError(f"specialist {m} was not run on every row asked for")
        return self.spec_values[m][where]


def _top_classes(gen: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    top1 = gen.max(dim=1).indices
    top = gen.topk(min(n, gen.shape[1]), dim=1).indices if n > 1 else top1[:, None]
    return top1, top
