"""Issue 17, findings 7-9: bad input and a hostile machine get one line, never a traceback or
silently damaged data; artifacts are readable as the umask allows and killed writes leave nothing.

Each case runs a command as a user would (``specdistill ...`` in this process, or a subprocess where
the process itself is the point: a kill, a signal) and checks: exit code, one ``error:`` line naming
the problem and the fix, no traceback, nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specdistill.cli import main as specdistill

TINY = """\
name: bad-input
seed: 0
data: {source: synthetic, num_classes: 6, group_size: 3, examples_per_class: 12, image_size: 8,
       augment: false, cache_dir: CACHE}
generalist:
  model: {name: resnet_cifar, depth: 8, width: 4}
  train: {epochs: 1, batch_size: 32, lr: 0.1}
clustering: {k: 2, min_size: 2, backend: sklearn, n_init: 1}
specialists:
  train: {epochs: 1, batch_size: 16, lr: 0.01}
  ray_address: local
student:
  model: {name: resnet_cifar, depth: 8, width: 4}
  train: {epochs: 1, batch_size: 32}
  baselines: false
"""


def _error_line(capsys, argv: list[str], code: int = 2) -> str:
    """Run ``specdistill ARGV`` here; it must exit ``code`` with exactly one ``error:`` line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        specdistill(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    lines = [line.strip() for line in re.split(r"[\r\n]", err) if line.strip()]   # progress bars use \r
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    assert "Traceback" not in err
    return errors[0]


def _stamps(root: Path) -> dict[Path, tuple]:
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in root.rglob("*") if p.is_file()}


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("config")
    path = folder / "tiny.yaml"
    path.write_text(TINY.replace("CACHE", str(folder / "cache")))
    return path


@pytest.fixture(scope="module")
def clustered_run(config, tmp_path_factory) -> Path:
    """A run directory whose generalist and clustering finished (what later stages read)."""
    run = tmp_path_factory.mktemp("runs") / "clustered"
    specdistill(["run", str(config), "--run-dir", str(run), "--until", "clustering"])
    assert (run / "clustering" / "clusters.json").exists()
    return run


# ---------------------------------------------------------------------------------------------- mounts


@contextlib.contextmanager
def _mounted(target: Path, *options: str):
    """``mount`` as root (a tiny tmpfs, a read-only bind); None where this machine does not allow it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    done = subprocess.run(["mount", *options, str(target)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` read-only: a read-only bind mount as root (root ignores permission bits), else chmod."""
    with _mounted(folder, "--bind", str(folder)) as bound:
        if bound is not None:
            if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode == 0:
                yield "mount"
                return
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield "chmod"
        finally:
            for p, mode in modes.items():
                p.chmod(mode)


# ---------------------------------------------------------------------------------------------- finding 7


def test_finding7_safetensors_disk_full_is_one_line(config, tmp_path, capsys, monkeypatch):
    """A real full disk inside a safetensors write (the generalist's checkpoint): one line, no .tmp."""
    disk = tmp_path / "disk"
    disk.mkdir()
    with _mounted(disk, "-t", "tmpfs", "-o", "size=64k", "tmpfs") as mounted:
        if mounted is None:   # no root: the error safetensors raises on a full disk, at its call
            from safetensors import SafetensorError

            def full(*args, **kwargs):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            monkeypatch.setattr("specdistill.artifacts.save_file", full)
        line = _error_line(capsys, ["generalist", "--config", str(config), "--run-dir", str(disk / "run")])
        assert "disk full while writing" in line and ".safetensors" in line and "free space" in line
        assert not list(disk.rglob("*.tmp")) and not list(disk.rglob("*.safetensors"))
        assert not (disk / "run" / "generalist" / "done.json").exists()


def test_finding7_read_only_run_dir_is_one_line_and_config_yaml_is_not_rewritten(
        clustered_run, config, tmp_path, capsys):
    run = _copy(clustered_run, tmp_path / "run")
    argv = ["run", str(config), "--run-dir", str(run), "--until", "clustering"]
    specdistill(argv)   # records the new run_dir in config.yaml
    before = _stamps(run)
    specdistill(argv)   # both stages done: skipped, and the unchanged config.yaml is left alone
    assert _stamps(run)[run / "config.yaml"] == before[run / "config.yaml"]
    before = _stamps(run)
    with _read_only(run):
        line = _error_line(capsys, argv)
    assert str(run) in line and ("writable" in line or "another --run-dir" in line), line
    assert _stamps(run) == before


def test_finding7_run_dir_that_is_a_file_is_one_line(config, tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    line = _error_line(capsys, ["generalist", "--config", str(config), "--run-dir", str(blocker)])
    assert str(blocker) in line and "file" in line
    line = _error_line(capsys, ["generalist", "--config", str(config), "--run-dir", str(blocker / "below")])
    assert str(blocker) in line and "file" in line
    assert blocker.read_text() == "not a folder"


def test_finding7_config_path_a_folder_or_not_utf8_is_one_line(tmp_path, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    line = _error_line(capsys, ["run", str(folder), "--run-dir", str(tmp_path / "run")])
    assert "is a folder" in line and "YAML file" in line
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    line = _error_line(capsys, ["run", str(latin1), "--run-dir", str(tmp_path / "run")])
    assert "line 1" in line and "UTF-8" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["string ids", "list at the top"])
def test_finding7_clusters_json_with_string_ids_or_a_list_is_one_line(clustered_run, config, tmp_path,
                                                                      capsys, damage):
    run = _copy(clustered_run, tmp_path / "run")
    path = run / "clustering" / "clusters.json"
    clusters = json.loads(path.read_text())
    if damage == "string ids":
        clusters["groups"][0]["classes"] = [str(c) for c in clusters["groups"][0]["classes"]]
    else:
        clusters = clusters["groups"]
    path.write_text(json.dumps(clusters))
    line = _error_line(capsys, ["specialists", "--config", str(config), "--run-dir", str(run)])
    assert str(path) in line and "clustering" in line
    assert not list((run / "specialists").glob("*.safetensors")) if (run / "specialists").exists() else True


def test_finding7_probs_a_folder_is_one_line(tmp_path, capsys):
    folder = tmp_path / "preds"
    folder.mkdir()
    line = _error_line(capsys, ["cluster", "--probs", str(folder), "--k", "2", "--run-dir", str(tmp_path / "run")])
    assert f"--probs {folder} is a folder" in line
    assert not (tmp_path / "run" / "clustering").exists()


def _image_folder(root: Path, classes: dict[str, list[np.ndarray]]) -> Path:
    for name, images in classes.items():
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def _folder_config(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "folder.yaml"
    path.write_text(f"name: folder\ndata: {{source: imagefolder, root: {root}, image_size: 8, "
                    f"cache_dir: {tmp_path / 'cache'}}}\ngeneralist:\n  model: {{depth: 8, width: 4}}\n"
                    "  train: {epochs: 1, batch_size: 8}\n")
    return path


def test_finding7_broken_symlink_in_an_image_folder_is_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = _image_folder(tmp_path / "images", {c: [rng.integers(0, 255, (8, 8, 3), np.uint8)] * 4 for c in "ab"})
    (root / "a" / "gone.png").symlink_to(tmp_path / "deleted.png")
    line = _error_line(capsys, ["generalist", "--config", str(_folder_config(tmp_path, root)),
                                "--run-dir", str(tmp_path / "run")])
    assert str(root / "a" / "gone.png") in line and "broken link" in line and "delete" in line
    assert not (tmp_path / "run" / "generalist").exists()


# ---------------------------------------------------------------------------------------------- finding 8


def test_finding8_16_and_32_bit_images_are_scaled_by_bit_depth(tmp_path):
    """A 0..65520 16-bit gradient must decode to about 0..255 (convert("RGB") made it 215..255)."""
    from specdistill.config import DataConfig
    from specdistill.data.folder import load_imagefolder

    gradient = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(4):   # every class: 16-bit PNG, 16-bit TIFF, 32-bit integer TIFF, float TIFF
            Image.fromarray((gradient * 65520).astype(np.uint16)).save(root / name / f"{i}-16.png")
            Image.fromarray((gradient * 65520).astype(np.uint16)).save(root / name / f"{i}-16.tif")
            Image.fromarray((gradient * (2**31 - 1)).astype(np.int32)).save(root / name / f"{i}-32.tif")
            Image.fromarray(gradient.astype(np.float32)).save(root / name / f"{i}-f.tif")
    data = load_imagefolder(DataConfig(source="imagefolder", root=str(root), image_size=32, val_fraction=0.25,
                                       cache_dir=str(tmp_path / "cache")))
    for split in (data.train, data.val, data.test):
        for image in split.images:
            assert image.min() <= 2 and image.max() >= 253, (image.min(), image.max())
            assert abs(float(image.mean()) - 127.5) < 3


def test_finding8_empty_config_file_is_refused(tmp_path, capsys):
    for text in ("", "# only a comment\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        line = _error_line(capsys, ["run", str(empty), "--run-dir", str(tmp_path / "run")])
        assert f"{empty} is empty" in line
    assert not (tmp_path / "run").exists()


def test_finding8_single_class_image_folder_is_refused_at_data_load(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = _image_folder(tmp_path / "images", {"only": [rng.integers(0, 255, (8, 8, 3), np.uint8)] * 6})
    began = time.perf_counter()
    line = _error_line(capsys, ["generalist", "--config", str(_folder_config(tmp_path, root)),
                                "--run-dir", str(tmp_path / "run")])
    assert "1 class folder" in line and "at least two" in line
    assert not (tmp_path / "run" / "generalist").exists() and time.perf_counter() - began < 30


# ---------------------------------------------------------------------------------------------- finding 9


def test_finding9_artifacts_are_readable_as_the_umask_allows(clustered_run, tmp_path):
    from specdistill.artifacts import save_weights, write_json

    umask = os.umask(0o022)
    os.umask(umask)
    files = [p for p in clustered_run.rglob("*") if p.is_file()]
    assert files and {p: p.stat().st_mode & 0o777 for p in files} == {p: 0o666 & ~umask for p in files}
    import torch

    previous = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {})
        save_weights(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640


KILLED_WRITE = """
import os, sys, time
from specdistill.artifacts import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_finding9_tmp_files_left_by_a_killed_write_are_cleaned(clustered_run, config, tmp_path, capsys):
    from specdistill.artifacts import _HOST

    run = _copy(clustered_run, tmp_path / "run")
    folder = run / "clustering"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(folder / "clusters.json")],
                              stdout=subprocess.PIPE, text=True)
    killed = Path(writer.stdout.readline().strip())
    writer.kill()
    writer.wait()
    assert killed.exists()
    old = time.time() - 120
    live = folder / f".groups.png.{_HOST}-{os.getpid()}-0123abcd.tmp"            # this process: alive
    elsewhere = folder / ".covariance.png.0badc0de-1-0123abcd.tmp"               # another node, recent
    stale = folder / ".clusters.json.0badc0de-1-89abcdef.tmp"                     # another node, hours old
    unnamed = folder / ".clusters.json.k2j4_x9q.tmp"                              # an older version's name
    foreign = folder / ".notes.tmp"                                                # not ours at all
    for path in (live, elsewhere, stale, unnamed, foreign):
        path.write_bytes(b"x")
    for path in (killed, live, elsewhere, foreign):
        os.utime(path, (old, old))
    for path in (stale, unnamed):
        os.utime(path, (old - 7200, old - 7200))
    young = folder / f".clusters.json.{_HOST}-{writer.pid}-fedcba98.tmp"         # dead writer, seconds old
    young.write_bytes(b"x")
    specdistill(["cluster", "--run-dir", str(run), "--force"])
    capsys.readouterr()
    left = {p.name for p in folder.glob(".*.tmp")}
    assert left == {live.name, elsewhere.name, foreign.name, young.name}


def test_finding9_bad_k_flag_is_blamed_on_the_flag(clustered_run, tmp_path, capsys):
    run = _copy(clustered_run, tmp_path / "run")
    before = _stamps(run)
    line = _error_line(capsys, ["cluster", "--run-dir", str(run), "--k", "0"])
    assert line.startswith("error: --k 0:") and "config.yaml" not in line and "greater than or equal to 1" in line
    line = _error_line(capsys, ["cluster", "--run-dir", str(run), "--set", "clustering.min_size=0"])
    assert line.startswith("error: --set clustering.min_size=0:")
    assert _stamps(run) == before


def test_finding9_yaml_error_keeps_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata:\n  source: [synthetic\n  image_size: 8\n")
    line = _error_line(capsys, ["run", str(bad), "--run-dir", str(tmp_path / "run")])
    assert "line " in line and "column " in line and "line 3" in line, line


def test_finding9_cross_field_error_names_the_fields_not_the_whole_config(tmp_path, capsys):
    cross = tmp_path / "cross.yaml"
    cross.write_text("name: x\nclustering: {size: 2, min_size: 5}\nstudent: {teacher_seeds: [0, 1, 2, 3]}\n")
    line = _error_line(capsys, ["run", str(cross), "--run-dir", str(tmp_path / "run")])
    assert "clustering.size (2)" in line and "clustering.min_size (5)" in line and "teacher_seeds" not in line
    assert len(line) < 250, line


SIGTERM_DURING_RAY = """
import time
from specdistill.errors import exit_on_error
from specialists.ray_cluster import connect_ray

@exit_on_error
def main():
    connect_ray("local")
    print("connected", flush=True)
    time.sleep(120)

main()
"""


def test_finding9_sigterm_after_ray_started_is_one_line(tmp_path):
    """Ray's abseil handler prints a C++ stack dump on SIGTERM; the entry points take SIGTERM back."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_DURING_RAY], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parents[1])
    try:
        assert proc.stdout.readline().strip() == "connected", proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM received" not in err and "Traceback" not in err and "PC: @" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("terminated: finished work is saved")
