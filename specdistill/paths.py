"""Where a run directory and a config are found: the same place from any working directory.

A command may start anywhere: ``ray submit`` runs the entry script from the head node's home
directory, ``ray exec`` from wherever its ``cd`` went, ``ray job submit`` from Ray's temporary copy of
the working directory. So a relative path never means "relative to the current directory":

* the *project home* is ``$SPECDISTILL_HOME`` if set, else the checkout this code runs from (the
  folder holding ``pyproject.toml`` beside the ``specdistill`` package: ``pip install -e .``), else,
  for a wheel install, the current directory;
* a run directory (``run_dir`` in the config or ``--run-dir``) expands ``~`` and ``$VARS``; relative,
  it lies under the project home; unset, it is ``<home>/runs/<name>``;
* a config path (``--config``) is taken from the current directory when the file is there, else
  from the project home, else from the checkout (``configs/quickstart.yaml`` works from ``~`` on a
  cluster's head).

Code running from Ray's temporary working-directory copy (``ray job submit --working-dir .``) has no
lasting home: a relative run directory there is refused, since it would vanish with the job.
"""

from __future__ import annotations

import os
from pathlib import Path

from specdistill.errors import SpecdistillError

HOME_ENV = "SPECDISTILL_HOME"
_CHECKOUT = Path(__file__).resolve().parents[1]


def expand(path: str | os.PathLike) -> Path:
    """``~`` and ``$VARS`` expanded (a folder literally named ``~`` is never what a user meant)."""
    return Path(os.path.expanduser(os.path.expandvars(os.fspath(path))))


def in_ray_upload(path: Path) -> bool:
    """A path inside Ray's copy of an uploaded working directory (``runtime_resources/working_dir_files``)."""
    return "runtime_resources" in path.parts


def project_home() -> Path:
    """The absolute folder that relative run directories and configs are resolved against."""
    env = os.environ.get(HOME_ENV)
    if env:
        return expand(env).resolve()
    if (_CHECKOUT / "pyproject.toml").is_file():
        if in_ray_upload(_CHECKOUT):
            raise SpecdistillError(
                f"this code runs from Ray's temporary copy of the working directory ({_CHECKOUT}), which is "
                "deleted with the job: give an absolute --run-dir on the cluster's storage (e.g. --run-dir "
                f"'~/specdistill-runs/NAME'), or set {HOME_ENV} on the cluster (ray job submit --runtime-env-json "
                f"'{{\"env_vars\": {{\"{HOME_ENV}\": \"/data/specdistill\"}}}}')")
        return _CHECKOUT
    return Path.cwd().resolve()


def resolve_run_dir(run_dir: str | os.PathLike | None, name: str) -> Path:
    """The absolute run directory of an experiment (see the module docstring)."""
    if run_dir:
        path = expand(run_dir)
        return path if path.is_absolute() else project_home() / path
    return project_home() / "runs" / name


def find_config(path: str | os.PathLike) -> Path:
    """An existing config file: as given (the current directory), else under the project home, else
    under the checkout (configs/ ship with the code even when SPECDISTILL_HOME keeps the runs elsewhere)."""
    given = expand(path)
    if given.is_absolute() or given.is_file():
        return given.resolve() if given.exists() else given
    places = [Path.cwd()]
    try:
        places.append(project_home())
    except SpecdistillError:   # Ray's temporary working directory: the current directory only
        pass
    places.append(_CHECKOUT)
    for place in dict.fromkeys(places):
        if (place / given).is_file():
            return (place / given).resolve()
    looked = ", ".join(str(place) for place in dict.fromkeys(places))
    raise SpecdistillError(f"config file {path} not found in the current directory, the project home or the "
                           f"checkout ({looked}); see configs/ for examples")


def elsewhere_hint(run_root: Path, relative: str | os.PathLike) -> str:
    """``"; found ... at X: pass --run-dir X"`` when another usual place holds what ``run_root`` lacks."""
    others = other_runs_with(relative, Path(run_root).name, Path(run_root))
    if not others:
        return ""
    return f"; found {Path(relative).as_posix()} in {others[0]}: pass --run-dir {others[0]} (or set {HOME_ENV})"


def other_runs_with(relative: str | os.PathLike, name: str, looked: Path) -> list[Path]:
    """Run directories of experiment ``name`` holding ``relative`` elsewhere than ``looked``: where an
    earlier stage may have written when it started in another directory (for error messages)."""
    candidates = [Path.cwd() / "runs" / name, Path.home() / "runs" / name,
                  Path.home() / "specdistill" / "runs" / name, _CHECKOUT / "runs" / name]
    found: list[Path] = []
    for candidate in candidates:
        try:
            candidate = candidate.resolve()
        except OSError:
            continue
        if candidate != looked.resolve() and candidate not in found and (candidate / relative).exists():
            found.append(candidate)
    return found
