"""Run a command as a user types it, inside the test process."""

from __future__ import annotations

import contextlib
import importlib
import io
import subprocess
import sys


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args``, run in this process: the same ``main`` and exit codes, without
    paying for a new interpreter and its imports every time (about 8 s each here)."""
    main = importlib.import_module(module).main
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv[:]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = argv   # specdistill's dispatcher sets it, as for a real command
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line a failed command printed (asserting it is one line, exit 2)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    printed = proc.stderr.strip()
    line = printed.split("\r")[-1].strip()   # what stays on a terminal after progress bars cleared themselves
    assert line.startswith("error:") and "\n" not in printed and "Traceback" not in proc.stdout, printed[-2000:]
    return line
