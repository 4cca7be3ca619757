"""Render once, load fast: a data set cached as uint8 ``.npy`` arrays plus one JSON of class names.

A cache entry lives in ``<root>/<source>-<hash of options>/``: ``{train,val,test}-{images,labels}.npy``
and ``dataset.json``, which is written last, so an entry whose JSON exists is complete (every file
goes through :mod:`specdistill.artifacts`' atomic writes). Anything that changes the arrays (size,
copies, seeds, the font files, the code's ``CACHE_VERSION``) belongs in the options, so a stale
entry is never read. A file lock makes concurrent loaders (Ray workers, parallel tests) render an
entry once: the others wait for it and then read it.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from specdistill.artifacts import read_json, read_npy, write_json, write_npy
from specdistill.config import DataConfig
from specdistill.data import Dataset, Split
from specdistill.errors import SpecdistillError
from specdistill.hashing import digest_json

CACHE_VERSION = 1   # bump when a source's output changes for the same options
_SPLITS = ("train", "val", "test")


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$SPECDISTILL_CACHE``, else ``$XDG_CACHE_HOME/specdistill``, else ~/.cache."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("SPECDISTILL_CACHE"):
        return Path(os.environ["SPECDISTILL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "specdistill"


def options_hash(options: dict[str, Any]) -> str:
    """Names the cache folder: the options and ``CACHE_VERSION``, so a stale entry is never read."""
    return digest_json({"cache_version": CACHE_VERSION, **options})


def cache_path(cfg: DataConfig, source: str, options: dict[str, Any]) -> Path:
    return cache_root(cfg) / f"{source}-{options_hash(options)}"


def load_or_build(cfg: DataConfig, source: str, options: dict[str, Any],
                  build: Callable[[], Dataset]) -> Dataset:
    """The cached data set for these options, building (and saving) it first if needed."""
    path = cache_path(cfg, source, options)
    dataset = _load(path)
    if dataset is not None:
        return dataset
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecdistillError(
            f"cannot create the data cache {path} ({exc.strerror}); set data.cache_dir to a writable folder"
        ) from None
    with _locked(path / ".lock"):
        dataset = _load(path)   # another process may have built it while we waited
        if dataset is None:
            dataset = build()
            _save(path, dataset, options)
            dataset.meta["cache_path"] = str(path)
    return dataset


def _save(path: Path, dataset: Dataset, options: dict[str, Any]) -> None:
    for name in _SPLITS:
        split = dataset.split(name)
        write_npy(path / f"{name}-images.npy", split.images)
        write_npy(path / f"{name}-labels.npy", split.labels)
    write_json(path / "dataset.json", {
        "name": dataset.name, "class_names": dataset.class_names, "meta": dataset.meta,
        "options": options, "cache_version": CACHE_VERSION,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    })


def _load(path: Path) -> Dataset | None:
    index = path / "dataset.json"
    if not index.exists():
        return None
    try:
        info = read_json(index)
        splits = {name: Split(read_npy(path / f"{name}-images.npy"), read_npy(path / f"{name}-labels.npy"))
                  for name in _SPLITS}
    except (SpecdistillError, ValueError) as exc:
        warnings.warn(f"data cache {path} is damaged ({exc}); rebuilding it", stacklevel=3)
        index.unlink(missing_ok=True)
        return None
    meta = dict(info.get("meta") or {})
    meta["cache_path"] = str(path)
    return Dataset(info["name"], list(info["class_names"]), splits["train"], splits["val"], splits["test"],
                   meta)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock; atomic writes still keep entries whole
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
