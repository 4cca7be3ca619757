"""One exception type for every problem a user can fix, and the wrapper that prints it as one line.

Library code raises :class:`SpecdistillError` with a message that names the problem *and* the fix;
entry points wrap their ``main`` in :func:`exit_on_error` so the user sees one line and a non-zero
exit code instead of a traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class SpecdistillError(Exception):
    """A problem with the user's input (config, data, checkpoint, cluster) that they can fix."""


_STORAGE_FIXES = {
    errno.ENOSPC: "free space and run the same command again (finished artifacts are intact)",
    errno.EDQUOT: "free space and run the same command again (finished artifacts are intact)",
    errno.EROFS: "make it writable, or choose another place (--run-dir, data.cache_dir)",
    errno.EACCES: "make it accessible to this user, or choose another place (--run-dir, data.cache_dir)",
    errno.ENOTDIR: "a file stands where a folder should be: move it away or choose another --run-dir",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's stop): stop as Ctrl-C does, and say so in one line."""


_sigterm_received = threading.Event()   # Ray turns any exception raised while it waits into KeyboardInterrupt


def _raise_terminated(signum: int, frame: object) -> None:
    _sigterm_received.set()
    raise Terminated()


def handle_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (exit 143 with one line).

    ``ray.init`` installs abseil's failure-signal handler for SIGTERM, which prints a C++ stack dump
    before chaining to Python's handler: call this again after connecting to Ray to take SIGTERM
    back (only SIGTERM: Ray's crash reports for SIGSEGV and the like stay).
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def exit_on_error(fn: F) -> F:
    """Run an entry point; a :class:`SpecdistillError` becomes one ``error:`` line and exit code 2.

    Ctrl-C (exit 130) and SIGTERM (exit 143) stop with one line too. Set ``SPECDISTILL_TRACEBACK=1``
    to see the full traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        handle_sigterm()
        try:
            return fn(*args, **kwargs)
        except SpecdistillError as exc:
            if os.environ.get("SPECDISTILL_TRACEBACK"):
                raise
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as exc:   # the last net under the library's own checks: storage the user can fix
            fix = _STORAGE_FIXES.get(exc.errno)
            if fix is None or os.environ.get("SPECDISTILL_TRACEBACK"):
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            print(f"error: {exc.strerror}{where}; {fix}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated) or _sigterm_received.is_set()
            print(f"{'terminated' if terminated else 'interrupted'}: finished work is saved; run the same "
                  "command again to resume", file=sys.stderr)
            raise SystemExit(143 if terminated else 130) from None

    return wrapper  # type: ignore[return-value]
