"""One exception type for every problem a user can fix, and the wrapper that prints it as one line.

Library code raises :class:`SpecdistillError` with a message that names the problem *and* the fix;
entry points wrap their ``main`` in :func:`exit_on_error` so the user sees one line and a non-zero
exit code instead of a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class SpecdistillError(Exception):
    """A problem with the user's input (config, data, checkpoint, cluster) that they can fix."""


def exit_on_error(fn: F) -> F:
    """Run an entry point; a :class:`SpecdistillError` becomes one ``error:`` line and exit code 2.

    Set ``SPECDISTILL_TRACEBACK=1`` to see the full traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpecdistillError as exc:
            if os.environ.get("SPECDISTILL_TRACEBACK"):
                raise
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted: finished work is saved; run the same command again to resume",
                  file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
