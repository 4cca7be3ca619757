"""A run directory and a config are found the same way from any working directory (issue 14)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from specdistill import paths
from specdistill.config import load_config
from specdistill.errors import SpecdistillError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Start in an unrelated directory, with no SPECDISTILL_HOME."""
    monkeypatch.delenv(paths.HOME_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_default_run_directory_is_under_the_checkout_from_anywhere(elsewhere):
    assert paths.project_home() == REPO
    assert load_config(None, ["name=demo"]).run_path == REPO / "runs" / "demo"
    assert load_config(None, ["run_dir=runs/x"]).run_path == REPO / "runs" / "x"


def test_tilde_and_variables_expand_instead_of_making_a_folder_named_tilde(elsewhere, monkeypatch):
    monkeypatch.setenv("HOME", str(elsewhere / "home"))
    monkeypatch.setenv("SCRATCH", str(elsewhere / "scratch"))
    assert load_config(None, ["run_dir=~/x"]).run_path == elsewhere / "home" / "x"
    assert load_config(None, ["run_dir=$SCRATCH/y"]).run_path == elsewhere / "scratch" / "y"
    assert load_config(None, [f"run_dir={elsewhere}/abs"]).run_path == elsewhere / "abs"


def test_specdistill_home_moves_every_relative_run_directory(elsewhere, monkeypatch):
    monkeypatch.setenv(paths.HOME_ENV, str(elsewhere / "store"))
    assert load_config(None, ["name=a"]).run_path == elsewhere / "store" / "runs" / "a"
    assert load_config(None, ["run_dir=b"]).run_path == elsewhere / "store" / "b"


def test_a_config_is_found_in_the_current_directory_else_in_the_project_home(elsewhere):
    assert paths.find_config("configs/quickstart.yaml") == REPO / "configs" / "quickstart.yaml"
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs" / "quickstart.yaml").write_text("name: mine\n")
    assert paths.find_config("configs/quickstart.yaml") == elsewhere / "configs" / "quickstart.yaml"
    with pytest.raises(SpecdistillError, match=r"config file configs/nope\.yaml not found in the current "
                                               r"directory, the project home or the checkout \("):
        paths.find_config("configs/nope.yaml")


def test_ray_s_temporary_working_directory_is_no_home(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.HOME_ENV, raising=False)
    upload = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    (upload).mkdir(parents=True)
    (upload / "pyproject.toml").write_text("")
    monkeypatch.setattr(paths, "_CHECKOUT", upload)
    with pytest.raises(SpecdistillError, match=r"Ray's temporary copy .* absolute --run-dir"):
        _ = load_config(None).run_path
    assert load_config(None, [f"run_dir={tmp_path}/runs/x"]).run_path == tmp_path / "runs" / "x"


def test_a_stage_started_anywhere_prints_the_run_directory_and_where_a_generalist_is(tmp_path):
    """`ray submit` runs train_specialists.py from the home directory: the stage prints the absolute
    run directory and, when the generalist is elsewhere, the path it looked at and where one is."""
    home = tmp_path / "store"
    stray = tmp_path / "runs" / "quickstart" / "generalist"   # what the old cwd-relative default wrote
    stray.mkdir(parents=True)
    (stray / "model.safetensors").write_bytes(b"")
    env = {"SPECDISTILL_HOME": str(home), "PATH": "/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, str(REPO / "train_specialists.py"), "--config", "configs/quickstart.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"run directory: {home / 'runs' / 'quickstart'}" in done.stdout
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: missing generalist checkpoint {home / 'runs' / 'quickstart'}")
    assert f"found generalist/model.safetensors in {tmp_path / 'runs' / 'quickstart'}" in error
