"""The run directory: atomic writes, weights as safetensors + JSON, and stage completion markers.

Every artifact is written to a temporary name in the same directory and renamed into place, so a
file that exists is complete. Nothing here unpickles: arrays are ``.npy`` loaded with
``allow_pickle=False`` and weights are safetensors.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specdistill.errors import SpecdistillError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, else remove it.

    The temporary file is created with the permissions the umask allows (as ``open`` would), so
    results and a shared data cache are readable by whoever the umask lets read them. Leftovers of
    writes killed earlier in the same folder are removed first (:func:`remove_leftovers`). A full
    disk, a read-only or forbidden folder, or a file where a folder should be becomes one
    :class:`SpecdistillError` naming the file; the previous version of the file is left untouched.
    """
    path = Path(path)
    tmp_path = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_once(path.parent)
        os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = tmp_path.stat().st_mode & 0o777   # 0o666 less the umask, as open() would make it
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        yield tmp_path
        if tmp_path.stat().st_mode & 0o777 != mode:   # a writer that made its own file (safetensors: 0o600)
            tmp_path.chmod(mode)
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_error(path: Path, exc: OSError) -> Exception:
    """The one line for a write the user can make work (full disk, read-only, a file in the way);
    any other ``OSError`` is returned as it is (a bug or a broken machine: keep the traceback)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpecdistillError(f"disk full while writing {path}; free space and run the same command again "
                                "(finished artifacts are intact)")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return SpecdistillError(f"cannot write {path} ({exc.strerror}); make {path.parent} writable, or choose "
                                "another place (--run-dir for a run, data.cache_dir for the data cache)")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):   # mkdir through, or of, a file
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        return SpecdistillError(f"cannot write {path}: {blocker} is a file, not a folder; move it away or "
                                "choose another place (--run-dir for a run)")
    if exc.errno == errno.EISDIR:
        return SpecdistillError(f"cannot write {path}: it is a folder; move it away and run the same command "
                                "again")
    return exc


def _safetensors_os_error(exc: SafetensorError) -> Exception:
    """safetensors reports an I/O failure as text ("... (os error 28)"): recover the ``OSError``."""
    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return exc
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


# ---- temporary files that a killed write left behind

# ".<name>.<host>-<pid>-<random>.tmp": who wrote it, so a leftover can be told from a live write
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_OURS = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
_OLDER = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")   # tempfile.mkstemp's names, before the writer was named
LEFTOVER_GRACE_S = 10.0    # younger temporary files are never touched: a write may be starting
LEFTOVER_STALE_S = 3600.0  # unchanged this long, a write of another host (or an unnamed one) is dead
_CLEANED: dict[Path, float] = {}   # folder -> when this process last cleaned it


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _clean_once(folder: Path, every_s: float = 60.0) -> None:
    """Clean a folder at most once a minute per process: a stage writing thousands of files there
    lists it once, not once a file."""
    key = folder.absolute()
    if time.monotonic() - _CLEANED.get(key, -every_s) >= every_s:
        remove_leftovers(folder)
        _CLEANED[key] = time.monotonic()


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` that a killed process left in ``folder``.

    A leftover is one of our temporary names, older than :data:`LEFTOVER_GRACE_S`, whose writer is
    gone: a process of this host that no longer runs, or, for another host's writer (a shared
    folder) or an unnamed one, a file unchanged for :data:`LEFTOVER_STALE_S`. A running writer's file
    on this host is never removed, and another host's only once it stopped changing an hour ago.
    Returns what was removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if age >= LEFTOVER_GRACE_S and _abandoned(entry.name, age):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _abandoned(name: str, age: float) -> bool:
    ours = _OURS.match(name)
    if ours is not None:
        if ours["host"] == _HOST:
            return not _pid_alive(int(ours["pid"]))
        return age >= LEFTOVER_STALE_S
    return _OLDER.match(name) is not None and age >= LEFTOVER_STALE_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def write_text(path: str | os.PathLike, text: str, *, only_if_changed: bool = False) -> None:
    """Write ``text``; with ``only_if_changed`` a file that already holds it is left alone (its time
    stays, and a finished run on read-only storage is not written to)."""
    if only_if_changed and _holds(Path(path), text):
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _holds(path: Path, text: str) -> bool:
    try:
        return path.is_file() and path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False


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
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except SafetensorError as exc:   # e.g. a full disk: atomic_path turns the OSError into one line
            raise _safetensors_os_error(exc) from None


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
    for name, tensor in tensors.items():   # a valid file of NaNs would fail later, far from its cause
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SpecdistillError(f"checkpoint {path} holds NaN or infinite values (tensor {name}); "
                                   "delete it and run again")
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
