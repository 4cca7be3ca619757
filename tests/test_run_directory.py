"""A run directory that never lies (issue 17, findings 1-6): provenance, one owner, error lines whose fix works.

Each test follows a finding as a user would meet it: change something in a finished run directory,
run the documented command, and check that the run ends consistent (or stops with one line whose
fix, followed literally, finishes the run).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from specdistill.artifacts import load_weights, read_json, save_weights
from specdistill.records import CombineResult, SpecialistInfo
from specdistill.rundir import RunDir
from testkit.cli import one_line_error as _one_line
from testkit.cli import run_cli as _cli

TINY = Path(__file__).parent / "configs" / "tiny.yaml"
FAST = ["--set", "generalist.train.epochs=2", "--set", "student.train.epochs=1", "--set", "student.baselines=false",
        "--set", "specialists.ray_address=local"]   # an embedded Ray, whatever else runs on this machine


def _run(run: Path, *extra: str, config: Path = TINY) -> subprocess.CompletedProcess:
    return _cli("specdistill.cli", "run", str(config), "--run-dir", str(run), *FAST, *extra)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _stamps(run: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name not in ("config.yaml", ".lock")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "tiny"
    _ok(_run(run))
    return run


@pytest.fixture
def run_copy(finished, tmp_path) -> RunDir:
    target = tmp_path / "tiny"
    shutil.copytree(finished, target)
    (target / ".lock").unlink(missing_ok=True)
    return RunDir.at(target)


def _perturb(path: Path, scale: float = 1.5) -> None:
    """Rewrite a weights file as a retrain under the same config would: other values, same metadata."""
    tensors, meta = load_weights(path)
    save_weights(path, {k: v * scale if v.is_floating_point() else v for k, v in tensors.items()}, meta)


def test_finding1_a_changed_specialist_redoes_combine_and_student(run_copy):
    from specdistill.config import load_config, stage_hash
    from specdistill.provenance import mark_done
    from specialists.store import file_sha256

    run = run_copy
    # specialist 0 retrained under the same config (other weights, same key), the stage re-marked done
    _perturb(run.specialist_weights(0), 3.0)
    info = SpecialistInfo.read(run.specialist_info(0))
    info.weights_sha256 = file_sha256(run.specialist_weights(0))
    info.write(run.specialist_info(0))
    cfg = load_config(str(TINY), [f"run_dir={run.root}", "generalist.train.epochs=2", "student.train.epochs=1",
                                  "student.baselines=false"])
    ids = read_json(run.done("specialists"))["ids"]
    mark_done(run.root, "specialists", stage_hash(cfg, "specialists"), ids=ids)
    before = {p: p.stat().st_mtime_ns for p in (run.combine_eval, run.student_weights)}
    old_cache = read_json(run.teacher_cache("ensemble") / "cache.json")["key"]

    out = _ok(_run(run.root))
    assert "combine: redoing it" in out and "specialists stage's output changed" in out
    for path, stamp in before.items():
        assert path.stat().st_mtime_ns != stamp, f"{path} kept numbers from the old specialists"
    assert read_json(run.teacher_cache("ensemble") / "cache.json")["key"] != old_cache
    assert "already" in out.split("== specialists ==")[1].split("== combine ==")[0]   # nothing retrained
    assert _ok(_run(run.root)).count("already") >= 5                                  # and now it is consistent


def test_finding1_the_hard_label_baseline_is_keyed_by_the_data(tmp_path):
    from specdistill.config import Config
    from student.train import _run_folder, plan_students

    plan = next(p for p in plan_students(Config(student={"baselines": ["hard"]})) if p.name == "hard")
    cfg = Config()
    assert _run_folder(plan, "labels", cfg, "data-a") != _run_folder(plan, "labels", cfg, "data-b")
    augmented = cfg.model_copy(update={"data": cfg.data.model_copy(update={"augment": not cfg.data.augment})})
    assert _run_folder(plan, "labels", cfg, "data-a") != _run_folder(plan, "labels", augmented, "data-a")
    # photographs: the crop range is part of how they are augmented
    photos = Config(data={"source": "imagefolder", "root": "/data"})
    cropped = Config(data={"source": "imagefolder", "root": "/data", "crop_scale": [0.35, 1.0]})
    assert _run_folder(plan, "labels", photos, "data-a") != _run_folder(plan, "labels", cropped, "data-a")


def test_finding2_a_run_directory_of_other_data_is_refused_untouched_and_force_finishes(run_copy, tmp_path):
    run = run_copy
    other = tmp_path / "twelve.yaml"
    other.write_text(TINY.read_text().replace("num_classes: 24", "num_classes: 12"))
    before = _stamps(run.root)
    line = _one_line(_run(run.root, config=other))
    assert "holds a run on other data" in line and "data.num_classes" in line and "--force" in line
    assert _stamps(run.root) == before
    _ok(_run(run.root, "--force", config=other))                       # the fix the line names
    assert read_json(run.generalist_meta)["num_classes"] == 12
    assert _ok(_run(run.root, config=other)).count("already") >= 5


def test_finding3_a_damaged_generalist_checkpoint_the_fix_in_the_line_works(run_copy):
    run = run_copy
    run.generalist_weights.write_bytes(run.generalist_weights.read_bytes()[:100])
    line = _one_line(_cli("combine.evaluate", "--config", str(TINY), "--run-dir", str(run.root), *FAST, "--force"))
    assert str(run.generalist_weights) in line and "delete it and run again" in line
    run.generalist_weights.unlink()                                    # follow the line literally
    out = _ok(_run(run.root))
    assert "generalist: redoing it" in out
    CombineResult.read(run.combine_eval)


def test_finding3_a_specialist_naming_an_unknown_class_is_retrained_by_the_command_named(run_copy):
    run = run_copy
    raw = read_json(run.specialist_info(1))
    raw["classes"][0] = 999
    run.specialist_info(1).write_text(json.dumps(raw))
    line = _one_line(_cli("combine.evaluate", "--config", str(TINY), "--run-dir", str(run.root), *FAST, "--force"))
    assert "names class 999" in line and "specdistill run CONFIG --from specialists" in line
    out = _ok(_run(run.root, "--from", "specialists"))
    assert "1 to train" in out
    group = next(g for g in read_json(run.clusters)["groups"] if g["id"] == 1)
    assert SpecialistInfo.read(run.specialist_info(1)).classes == group["classes"]


def test_finding3_a_clusters_file_with_an_empty_group_is_rebuilt_by_the_same_command(run_copy):
    run = run_copy
    clusters = read_json(run.clusters)
    clusters["groups"][0]["classes"] = []
    run.clusters.write_text(json.dumps(clusters))
    out = _ok(_run(run.root))
    assert "clustering: redoing it" in out
    assert all(g["classes"] for g in read_json(run.clusters)["groups"])


def test_finding4_a_specialist_record_that_disagrees_with_its_group_is_refused_then_retrained(run_copy):
    run = run_copy
    groups = read_json(run.clusters)["groups"]
    raw = read_json(run.specialist_info(0))
    other = next(c for c in range(24) if c not in groups[0]["classes"])
    raw["classes"][-1] = other                                           # valid ids, wrong group
    run.specialist_info(0).write_text(json.dumps(raw))
    line = _one_line(_cli("combine.evaluate", "--config", str(TINY), "--run-dir", str(run.root), *FAST, "--force"))
    assert "names other classes than group 0" in line and "specdistill run CONFIG" in line
    out = _ok(_run(run.root))
    assert "1 to train" in out
    assert SpecialistInfo.read(run.specialist_info(0)).classes == groups[0]["classes"]


def test_finding4_a_checkpoint_of_nans_is_one_line_before_ray_starts(run_copy):
    run = run_copy
    tensors, meta = load_weights(run.generalist_weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_weights(run.generalist_weights, tensors, meta)
    proc = _cli("specialists.fanout", "--config", str(TINY), "--run-dir", str(run.root), *FAST, "--force")
    line = _one_line(proc)
    assert str(run.generalist_weights) in line and "NaN" in line
    assert "ray" not in proc.stdout.lower() and "Traceback" not in proc.stderr


def test_finding5_identical_generalist_weights_rewritten_retrain_nothing(run_copy):
    run = run_copy
    tensors, meta = load_weights(run.generalist_weights)
    meta["metrics"]["seconds"] += 1.0                                     # same tensors, other file bytes
    save_weights(run.generalist_weights, tensors, meta)
    stamps = {p: p.stat().st_mtime_ns for p in run.specialists.glob("*.safetensors")}
    out = _ok(_run(run.root))
    assert "redoing" not in out and out.count("already") >= 5
    assert {p: p.stat().st_mtime_ns for p in run.specialists.glob("*.safetensors")} == stamps


HOLD = """
import sys, time
from specdistill.owner import lock
from specdistill.rundir import RunDir
lock(RunDir.at(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_finding6_one_owner_per_run_directory_and_a_killed_owner_leaves_no_stale_lock(run_copy):
    run = run_copy
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _stamps(run.root)
        line = _one_line(_run(run.root))
        assert f"in use by process {holder.pid}" in line and "--run-dir" in line
        assert _stamps(run.root) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    assert _ok(_run(run.root)).count("already") >= 5                     # the kernel dropped the dead lock
