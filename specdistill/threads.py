"""Temporarily fewer threads for work made of many small operations.

Small tensor ops and small k-means steps gain little from a second thread, and on a shared, busy
machine every parallel region waits for a time slice while OpenMP's threads spin (measured: 3-40x
slower with 2 threads on a loaded 2-core box). These context managers set a pool's size for a
block and restore it afterwards, whatever the block raises; ``None`` leaves the pool alone, so a
caller can decide "one thread or as configured" with one expression.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def _pool_size(threads: int | None, get: Callable[[], int], set_: Callable[[int], None]) -> Iterator[None]:
    if threads is None or get() == threads:
        yield
        return
    before = get()
    set_(threads)
    try:
        yield
    finally:
        set_(before)


def torch_threads(threads: int | None) -> contextlib.AbstractContextManager[None]:
    """torch's intra-op pool at ``threads`` for the block (``None``: unchanged)."""
    return _pool_size(threads, torch.get_num_threads, torch.set_num_threads)


def faiss_threads(threads: int | None) -> contextlib.AbstractContextManager[None]:
    """faiss's own OpenMP pool at ``threads`` for the block (``None``: unchanged, faiss not imported).

    faiss keeps a pool that threadpoolctl does not always see, so it needs its own setter.
    """
    if threads is None:
        return contextlib.nullcontext()
    import faiss

    return _pool_size(threads, faiss.omp_get_max_threads, faiss.omp_set_num_threads)
