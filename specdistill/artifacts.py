"""The run directory: atomic writes, weights as safetensors + JSON, and stage completion markers.

Every artifact is written to a temporary name in the same directory and renamed into place, so a
file that exists is complete. Nothing here unpickles: arrays are ``.npy`` loaded with
``allow_pickle=False`` and weights are safetensors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specdistill.errors import SpecdistillError
from specdistill.rundir import RunDir

# bump when the run-directory layout changes incompatibly; 2: combine/eval.json holds per-split
# results (specdistill.records.CombineResult) and no longer repeats the ensemble's accuracy
FORMAT_VERSION = 2


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, else remove it.

    A full disk (ENOSPC) becomes a :class:`SpecdistillError` naming the file; the previous
    version of the file, if any, is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise SpecdistillError(
                f"disk full while writing {path}; free space and run the same command again "
                "(finished artifacts are intact)"
            ) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise SpecdistillError(f"missing file {path}; run the stage that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SpecdistillError(f"{path} is not valid JSON ({exc}); delete it and rerun its stage") from None


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def read_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise SpecdistillError(f"missing file {path}; run the stage that writes it first")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        raise SpecdistillError(f"{path} is corrupt or truncated ({exc}); delete it and rerun its stage") from None


def save_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> None:
    """Save tensors as safetensors; ``metadata`` (JSON-able) is stored inside the same file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"json": json.dumps(metadata or {}, default=_json_default)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and the JSON metadata saved by :func:`save_weights`; a bad file is one clear error."""
    path = Path(path)
    if not path.exists():
        raise SpecdistillError(f"missing weights {path}; run the stage that trains them first")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SpecdistillError(
            f"checkpoint {path} is corrupt or truncated ({exc}); delete it and run again"
        ) from None
    return tensors, json.loads(meta.get("json", "{}"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------------------------
# Stage completion: <run>/<stage>/done.json holds the hash of the config that produced the stage.


def mark_done(run_dir: str | os.PathLike, stage: str, config_hash: str, **extra: Any) -> None:
    write_json(RunDir.at(run_dir).done(stage),
               {"stage": stage, "config_hash": config_hash, "format_version": FORMAT_VERSION, **extra})


def is_done(run_dir: str | os.PathLike, stage: str, config_hash: str) -> bool:
    """True when the stage finished with this config hash; a different hash means 'redo'."""
    marker = RunDir.at(run_dir).done(stage)
    if not marker.exists():
        return False
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    check_format(marker, done)
    return done.get("config_hash") == config_hash


def check_format(marker: Path, done: dict) -> None:
    """A run directory written by a specdistill with another layout is refused, not misread."""
    found = done.get("format_version")
    if found != FORMAT_VERSION:
        older = found is None or (isinstance(found, int) and found < FORMAT_VERSION)
        age = "an older" if older else "a newer"
        raise SpecdistillError(
            f"{marker} was written by {age} specdistill (run-directory format {found}, this one reads "
            f"{FORMAT_VERSION}); use a new run directory, or pass --force to redo the stage here"
        )


def require_done(run_dir: str | os.PathLike, stage: str, config_hash: str | None = None) -> dict:
    """Check an upstream stage finished (and, if given, with this config hash) before reading it."""
    marker = RunDir.at(run_dir).done(stage)
    if not marker.exists():
        raise SpecdistillError(
            f"stage '{stage}' has not finished in {run_dir}; run it first (specdistill run CONFIG)"
        )
    done = read_json(marker)
    check_format(marker, done)
    if config_hash is not None and done.get("config_hash") != config_hash:
        raise SpecdistillError(
            f"{marker} was produced by a different config; rerun '{stage}' with this config "
            "(specdistill run CONFIG --from " + stage + ") or use another run directory"
        )
    return done
