"""End to end: the whole pipeline on a tiny config, every artifact present and consistent, and a
run killed in the middle of the specialist stage finishing without redoing finished work."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from specdistill.artifacts import load_weights, read_json
from specdistill.config import STAGES, load_config, stage_hash
from specdistill.provenance import FORMAT_VERSION
from specdistill.records import CombineResult

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def _run(run_dir: Path, *extra: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "specdistill.cli", "run", str(TINY), "--run-dir", str(run_dir),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, **kwargs)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline") / "tiny"
    out = _finish(_run(run))
    return run, out


def test_every_artifact_exists_and_agrees(finished_run):
    run, out = finished_run
    cfg = load_config(TINY, [f"run_dir={run}"])
    for stage in STAGES:
        assert read_json(run / stage / "done.json")["config_hash"] == stage_hash(cfg, stage)
    meta = read_json(run / "generalist" / "meta.json")
    k = meta["num_classes"]
    assert k == cfg.data.num_classes == len(meta["class_names"])
    labels_test = np.load(run / "generalist" / "labels-test.npy")
    for split in ("val", "test"):
        preds = np.load(run / "generalist" / f"preds-{split}.npy")
        labels = np.load(run / "generalist" / f"labels-{split}.npy")
        assert preds.shape == (len(labels), k) and np.allclose(np.exp(preds).sum(1), 1, atol=1e-4)
    clusters = read_json(run / "clustering" / "clusters.json")
    groups = {g["id"]: g for g in clusters["groups"]}
    assert groups and clusters["class_names"] == meta["class_names"]
    for g in groups.values():
        assert len(g["classes"]) >= cfg.clustering.min_size and max(g["classes"]) < k
        assert g["names"] == [meta["class_names"][c] for c in g["classes"]]
    specialist_files = sorted((run / "specialists").glob("[0-9]*.json"))
    assert len(specialist_files) == len(groups)
    for path in specialist_files:
        spec = read_json(path)
        assert spec["classes"] == groups[spec["id"]]["classes"]
        assert np.isfinite(spec["dustbin_correction"])
        assert path.with_suffix(".safetensors").stat().st_size > 0
        weights, wmeta = load_weights(path.with_suffix(".safetensors"))
        assert wmeta["model"]["width"] == 12 and weights["head.weight"].shape == (len(spec["classes"]) + 1, 48)
    ev = CombineResult.read(run / "combine" / "eval.json")
    assert ev.split("test").num_examples == len(labels_test) and ev.num_classes == k
    assert ev.num_specialists == len(groups)
    assert ev.table3("test")["generalist_acc"] == pytest.approx(meta["metrics"]["test_acc"], abs=1e-6)
    student = read_json(run / "student" / "eval.json")
    assert 0.0 <= student["test_acc"] <= 1.0 and (run / "student" / "model.safetensors").exists()
    report = (run / "report.md").read_text()
    for section in ("## Generalist", "Table 3", "Table 4", "## Distilled student", "Time and memory"):
        assert section in report
    for png in ("data-samples.png", "generalist-training.png", "clustering/covariance.png",
                "clustering/groups.png", "combine/table4.png"):
        assert (run / png).stat().st_size > 1000, png
        assert png in report or png.split("/")[-1] in report
    assert "generalist test acc" in out  # the summary table at the end of the run
    leftovers = [p for p in run.rglob("*.tmp")]
    assert not leftovers, leftovers


def test_a_second_run_skips_every_stage(finished_run):
    run, _ = finished_run
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    out = _finish(_run(run))
    assert "already" in out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")} == stamps


def test_killed_during_specialists_resumes_without_redoing_work(tmp_path):
    run = tmp_path / "tiny"
    proc = _run(run)
    first = run / "specialists" / "0000.json"
    deadline = time.time() + 600
    while not any((run / "specialists").glob("[0-9]*.json")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray workers die at once
    proc.wait()
    finished = sorted((run / "specialists").glob("[0-9]*.json"))
    assert finished and not (run / "specialists" / "done.json").exists()
    generalist_stamp = (run / "generalist" / "model.safetensors").stat().st_mtime_ns
    stamps = {p: p.with_suffix(".safetensors").stat().st_mtime_ns for p in finished}
    out = _finish(_run(run))
    assert "generalist: already trained" in out
    assert (run / "generalist" / "model.safetensors").stat().st_mtime_ns == generalist_stamp
    for path, stamp in stamps.items():
        assert path.with_suffix(".safetensors").stat().st_mtime_ns == stamp, f"{path.name} was retrained"
    assert (run / "student" / "done.json").exists()
    assert json.loads((run / "specialists" / "done.json").read_text())["stage"] == "specialists"
    del first


def test_a_run_directory_from_another_config_is_one_clear_line(finished_run, tmp_path):
    run, _ = finished_run
    proc = subprocess.run([sys.executable, "-m", "combine.evaluate", "--config", str(TINY), "--run-dir", str(run),
                           "--set", "generalist.train.epochs=7"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error:") and proc.stderr.strip().count("\n") == 0
    assert "different config" in proc.stderr or "not finished" in proc.stderr


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert line.startswith("error:") and "\n" not in line, proc.stderr[-2000:]
    return line


def _stamps(run: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name not in ("config.yaml", ".lock")}


def test_a_run_directory_from_an_older_format_is_refused_untouched(finished_run, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(finished_run[0], run)
    marker = run / "generalist" / "done.json"
    done = json.loads(marker.read_text())
    older = FORMAT_VERSION - 1     # e.g. a run made before combine/eval.json held per-split records
    marker.write_text(json.dumps({**done, "format_version": older}))
    before = _stamps(run)
    proc = _run(run)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:]
    assert f"written by an older specdistill (run-directory format {older}" in out and "--force" in out
    assert _stamps(run) == before


DISK_FULL = """
import errno, sys
import numpy as np
from specdistill.cli import main
def save(fh, array, **kw):  # the disk fills up halfway through the combine stage's first array
    fh.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")
np.save = save
main(sys.argv[1:])
"""


def test_a_disk_that_fills_up_mid_write_is_one_line_and_loses_nothing(finished_run, tmp_path):
    run = tmp_path / "full"
    shutil.copytree(finished_run[0], run)
    upstream = {p: t for p, t in _stamps(run).items() if p.parts[len(run.parts)] in
                ("generalist", "clustering", "specialists")}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, "run", str(TINY), "--run-dir", str(run),
                           "--from", "combine"], capture_output=True, text=True, env=env, timeout=300)
    line = _one_error_line(proc)
    assert "disk full while writing" in line and "run the same command again" in line
    assert not list(run.rglob("*.tmp")), "a partial file was left behind"
    assert not (run / "combine" / "done.json").exists()
    # space freed: the same command finishes, and nothing upstream was redone
    out = _finish(_run(run))
    assert "already" in out and (run / "student" / "done.json").exists()
    assert {p: t for p, t in _stamps(run).items() if p in upstream} == upstream


def test_every_stage_has_one_entry_point_in_pipeline_order():
    import importlib

    from specdistill.cli import COMMANDS, STAGE_ENTRY_POINTS

    assert tuple(STAGE_ENTRY_POINTS) == STAGES
    for module, function, command, _ in STAGE_ENTRY_POINTS.values():
        loaded = importlib.import_module(module)
        assert callable(getattr(loaded, function)) and callable(loaded.main)
        assert COMMANDS[command][0] == module


def test_a_stage_rerun_for_a_new_config_gets_its_new_time(tmp_path, monkeypatch):
    import types

    from specdistill import pipeline, provenance
    from specdistill.config import validate_config
    from specdistill.provenance import mark_done

    monkeypatch.setattr(provenance, "identity", lambda run, stage, ids=None: "no outputs")   # fake stages

    def stage(name):
        def run(cfg):
            time.sleep(cfg.student.train.epochs / 10 if name == "student" else 0)
            mark_done(cfg.run_path, name, stage_hash(cfg, name))
        return run

    fake = types.ModuleType("fake_stages")
    for name in STAGES:
        setattr(fake, f"run_{name}", stage(name))
    monkeypatch.setitem(sys.modules, "fake_stages", fake)
    monkeypatch.setattr(pipeline, "STAGE_ENTRY_POINTS", {s: ("fake_stages", f"run_{s}", s, "") for s in STAGES})
    monkeypatch.setattr(pipeline, "write_report", lambda cfg, timings: None)
    monkeypatch.setattr(pipeline, "print_summary", lambda cfg, timings: None)

    def cfg(epochs):
        return validate_config({"name": "t", "run_dir": str(tmp_path / "run"),
                                "student": {"train": {"epochs": epochs}}})

    pipeline.run_pipeline(cfg(1))
    first = read_json(tmp_path / "run" / "timings.json")
    pipeline.run_pipeline(cfg(5))          # only the student's config changed: it reruns, slower
    second = read_json(tmp_path / "run" / "timings.json")
    assert second["student"]["seconds"] >= 0.5 > first["student"]["seconds"]
    assert second["generalist"] == first["generalist"]
