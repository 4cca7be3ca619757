"""One owner per run directory: a lock held by the process that works in it, and one experiment in it.

Two processes writing the same run directory would both train everything and overwrite each other's
files; a config for other data run into a finished directory would replace half of it and leave
the rest disagreeing. So every entry point *claims* the run directory before touching it:

* a lock: ``<run>/.lock``, held with ``flock`` for the life of the process. The kernel releases it
  when the process ends, however it ends (kill -9 included), so a stale lock cannot block anyone;
  the file only says who held it last. A second process gets one line naming the holder;
* one experiment: a run directory whose ``config.yaml`` names other data (the ``data`` section) is
  refused before anything is touched, unless ``--force`` says to start it over. Changing anything
  else (epochs, k, the student) is what run directories are for: the stages concerned are redone.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from specdistill.errors import SpecdistillError
from specdistill.rundir import RunDir

if TYPE_CHECKING:
    from specdistill.config import Config

_HELD: dict[Path, Any] = {}   # resolved run directory -> the open lock file of this process


def lock(run: RunDir) -> None:
    """Take the run directory's lock for this process (a no-op when this process already holds it)."""
    root = run.root.resolve()
    if root in _HELD:
        return
    path = run.lock
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise SpecdistillError(f"cannot open the lock file {path} ({exc.strerror}); make {root} a writable "
                               "folder or choose another --run-dir") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = _describe(handle.read())
        handle.close()
        raise SpecdistillError(f"run directory {root} is in use by {holder}; wait for it to finish or stop "
                               "it, or use another --run-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                             "command": " ".join(sys.argv)[:300]}) + "\n")
    handle.flush()
    _HELD[root] = handle


def release(run: RunDir) -> None:
    """Give the lock back before the process ends (tests; a long-lived driver finishing one run)."""
    handle = _HELD.pop(run.root.resolve(), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"process {info['pid']} on {info['host']} since {since} ({info['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def check_same_experiment(run: RunDir, cfg: Config, force: bool) -> None:
    """Refuse a run directory that holds another experiment's data, unless ``force`` starts it over."""
    if force or not run.config.exists():
        return
    try:
        recorded = yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return   # an unreadable record is rewritten below; the stages' own checks still apply
    before = recorded.get("data") if isinstance(recorded, dict) else None
    now = cfg.data.model_dump(mode="json")
    if isinstance(before, dict) and _comparable(before) != _comparable(now):
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise SpecdistillError(
            f"run directory {run.root.resolve()} holds a run on other data (data.{', data.'.join(changed)} "
            "differ from its config.yaml); use another --run-dir, or pass --force to start this one over")


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "cache_dir"}   # where the cache lives changes nothing


def claim(run: RunDir, cfg: Config, force: bool = False) -> None:
    """Lock the run directory for this process and check that it holds this experiment."""
    if run.root.exists() and not run.root.is_dir():
        raise SpecdistillError(f"run directory {run.root.resolve()} is a file; remove it or choose another --run-dir")
    run.root.mkdir(parents=True, exist_ok=True)
    lock(run)
    check_same_experiment(run, cfg, force)
