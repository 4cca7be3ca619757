"""specdistill export: the student as ONNX + class names + preprocessing, checked against PyTorch.

The run directory is made by hand (a tiny student with filled batch-norm statistics and an input
normalisation of its own, saved where the student stage saves it and marked done), so the tests
pay for one export, not for a pipeline.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from specdistill.config import load_config, stage_hash
from specdistill.data import load_data
from specdistill.data.loading import to_float
from specdistill.models import build_model, load_classifier, save_classifier
from specdistill.provenance import current_identity, mark_done
from specdistill.rundir import RunDir

TINY = Path(__file__).parent / "configs" / "tiny.yaml"
MEAN, STD = [0.4], [0.3]
SETS = ["--set", f"student.model.mean={MEAN}", "--set", f"student.model.std={STD}"]


def _config(run: Path):
    return load_config(str(TINY), [f"run_dir={run}", f"student.model.mean={MEAN}", f"student.model.std={STD}"])


def _export(run: Path, *extra: str) -> tuple[int, str, str]:
    """``specdistill export`` as a user types it, run in this process (same main, same exit codes)."""
    from specdistill import cli

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv[:]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(["export", "--config", str(TINY), "--run-dir", str(run), *SETS, *extra])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def _make_student(run: Path, seed: int = 0) -> None:
    """A finished student stage: weights and meta as student.train writes them, done.json last."""
    cfg = _config(run)
    dataset = load_data(cfg.data, cfg.seed)
    torch.manual_seed(seed)
    model = build_model(cfg.student.model, dataset.num_classes, dataset.channels, dataset.image_size)
    model.train()
    with torch.no_grad():   # batch-norm statistics of real images, so eval mode is not the identity
        for start in range(0, 256, 64):
            model(to_float(torch.from_numpy(dataset.train.images[start:start + 64])))
    model.eval()
    meta = {"class_names": dataset.class_names, "num_classes": dataset.num_classes, "channels": dataset.channels,
            "image_size": dataset.image_size, "model": cfg.student.model.model_dump(mode="json")}
    save_classifier(RunDir.of(cfg).student_weights, model, meta)
    mark_done(run, "student", stage_hash(cfg, "student"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "tiny"
    _make_student(run)
    code, out, err = _export(run, "--check-examples", "70")
    assert code == 0, out[-3000:] + err[-3000:]
    return RunDir.at(run), out


def test_export_prints_the_absolute_paths_and_a_small_difference(exported):
    run, out = exported
    lines = [line for line in out.splitlines() if line.startswith("export:")]
    assert len(lines) == 2, out
    for path in (run.export_onnx("student"), run.export_preprocessing("student"), run.export_classes("student")):
        assert str(path.resolve()) in lines[0] and path.is_file()
    assert "70 held-out images" in lines[1] and "top-1 agreement 100.00%" in lines[1], lines[1]
    diff = float(lines[1].split("max abs logit difference ")[1].split(",")[0])
    assert diff < 1e-4


def test_onnx_matches_pytorch_on_other_batch_sizes(exported):
    import onnxruntime as ort

    run, _ = exported
    session = ort.InferenceSession(str(run.export_onnx("student")), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "image" and outp.name == "logits"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 16, 16]   # a dynamic batch axis
    model, meta = load_classifier(run.student_weights)
    assert model.input_scale is not None   # the student's own normalisation is part of what is compared
    cfg = _config(run.root)
    images = load_data(cfg.data, cfg.seed).val.images
    for batch in (1, 7, 33):   # the export traced a batch of 2
        x = images[-batch:]
        (got,) = session.run(None, {"image": (x[:, None].astype(np.float32) / 255.0)})
        with torch.no_grad():
            want = model(to_float(torch.from_numpy(x))).numpy()
        assert got.shape == (batch, meta["num_classes"])
        assert np.abs(got - want).max() < 1e-4
        assert np.abs(want).max() > 0.1   # logits that say something, not all zero


def test_classes_and_preprocessing_say_what_serving_needs(exported):
    import onnx

    run, _ = exported
    _, meta = load_classifier(run.student_weights)
    classes = json.loads(run.export_classes("student").read_text())
    assert classes == meta["class_names"] and len(classes) == 24
    pre = json.loads(run.export_preprocessing("student").read_text())
    assert pre["input"]["name"] == "image" and pre["input"]["shape"] == ["batch", 1, 16, 16]
    assert pre["input"]["channels"] == 1 and pre["input"]["value_range"] == [0.0, 1.0]
    assert pre["image_size"] == 16 and any("centre-crop 16x16" in step for step in pre["steps"])
    assert any("shorter side to 16" in step for step in pre["steps"])
    assert pre["normalisation"]["mean"] == MEAN and pre["normalisation"]["std"] == STD
    assert pre["output"]["name"] == "logits" and "logits" in pre["output"]["meaning"]
    assert pre["num_classes"] == 24 and pre["classes"] == "classes.json"
    assert pre["source"]["identity"] == current_identity(run, "student")
    assert pre["check"]["examples"] == 70 and pre["check"]["max_abs_diff"] < 1e-4
    assert pre["check"]["top1_agreement"] == 1.0 and isinstance(pre["opset"], int)
    # the graph carries the same record and classes, for serving code given the file alone
    props = {p.key: p.value for p in onnx.load(str(run.export_onnx("student"))).metadata_props}
    assert json.loads(props["specdistill.classes"]) == classes
    assert json.loads(props["specdistill.preprocessing"])["input"] == pre["input"]


def test_a_check_that_fails_writes_nothing_and_says_so(exported, tmp_path, monkeypatch):
    import onnx

    import student.export as export

    run = tmp_path / "tiny"
    _make_student(run, seed=1)   # another student; the graph below is the first one's
    other = onnx.load(str(exported[0].export_onnx("student")))
    monkeypatch.setattr(export, "export_onnx", lambda *args, **kwargs: other)
    code, out, err = _export(run, "--check-examples", "20")
    assert code == 2, out + err
    line = err.strip()
    assert line.startswith("error:") and "\n" not in line, err
    assert "differ from PyTorch's by up to" in line and "tolerance 0.001" in line and "nothing was written" in line
    assert not any(p.is_file() for p in RunDir.at(run).export.rglob("*"))


@pytest.mark.parametrize("model,first", [("student", "specdistill run"),
                                         ("generalist", "--until generalist")])
def test_a_run_without_the_model_stops_with_one_line(tmp_path, model, first):
    code, out, err = _export(tmp_path / "empty", "--model", model)
    assert code == 2, out + err
    line = err.strip()
    assert line.startswith("error:") and "\n" not in line and "Traceback" not in out + err
    assert f"no finished {model} to export" in line and first in line and str(TINY) in line
    assert not (tmp_path / "empty").exists()   # a mistyped --run-dir is not created
