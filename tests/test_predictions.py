"""Stored predictions (specdistill/predictions.py): dense where small, top-k + residual mass where
large; written in batches, read back by every stage that reads them."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from specdistill.config import Config, GeneralistConfig, load_config, stage_hash
from specdistill.errors import SpecdistillError
from specdistill.predictions import StoredPredictions, choose_form, write_predictions
from specdistill.rundir import RunDir

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def _log_probs(n=50, k=40, seed=0) -> np.ndarray:
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3
    return torch.log_softmax(logits, dim=1).numpy()


def _batches(array: np.ndarray, size: int):
    return (array[i:i + size] for i in range(0, len(array), size))


def test_dense_store_is_the_bytes_np_save_writes(tmp_path):
    lp = _log_probs()
    stored = write_predictions(tmp_path, "val", _batches(lp, 7), len(lp), lp.shape[1], "dense", 5)
    buffer = io.BytesIO()
    np.save(buffer, lp, allow_pickle=False)
    assert RunDir.preds_in(tmp_path, "val").read_bytes() == buffer.getvalue()
    assert stored.form == "dense" and stored.top_k is None and (stored.num_examples, stored.num_classes) == lp.shape
    assert np.array_equal(stored.dense(), lp)
    assert np.array_equal(np.concatenate([b for _, b in stored.blocks(9)]), lp)
    values, ids, residual = stored.top(4)
    assert np.array_equal(ids[:, 0], lp.argmax(1)) and np.array_equal(stored.argmax(), lp.argmax(1))
    np.testing.assert_allclose(np.exp(values).sum(1) + residual, 1.0, atol=1e-5)


def test_topk_store_keeps_the_top_and_the_residual_mass(tmp_path):
    lp = _log_probs()
    k = 5
    write_predictions(tmp_path, "test", _batches(lp, 7), len(lp), lp.shape[1], "topk", k)
    assert RunDir.topk_preds_in(tmp_path, "test").exists() and not RunDir.preds_in(tmp_path, "test").exists()
    again = StoredPredictions.open(tmp_path, "test")
    assert again.form == "topk" and again.top_k == k and again.num_classes == lp.shape[1]
    values, ids, residual = again.top()
    order = np.argsort(-lp, axis=1)[:, :k]
    assert np.array_equal(ids, order)
    assert np.array_equal(values, np.take_along_axis(lp, order, axis=1))
    rest = np.exp(lp.astype(np.float64))
    np.put_along_axis(rest, order, 0.0, axis=1)
    np.testing.assert_allclose(residual, rest.sum(1), rtol=1e-5)        # the mass of every other class
    np.testing.assert_allclose(np.exp(values.astype(np.float64)).sum(1) + residual, 1.0, atol=1e-6)
    dense = again.dense()                                               # the residual spread over the others
    np.testing.assert_allclose(np.exp(dense.astype(np.float64)).sum(1), 1.0, atol=1e-5)
    assert np.array_equal(np.take_along_axis(dense, order, axis=1), values)
    v3, i3, r3 = again.top(3)                                           # fewer: the cut mass joins the residual
    assert np.array_equal(i3, order[:, :3])
    np.testing.assert_allclose(np.exp(v3.astype(np.float64)).sum(1) + r3, 1.0, atol=1e-6)
    one_shot = write_predictions(tmp_path / "one", "test", [lp], len(lp), lp.shape[1], "topk", k)
    assert one_shot.content_digest() == again.content_digest()          # batches change nothing
    # writing the other form replaces the first: a folder holds one
    write_predictions(tmp_path, "test", [lp], len(lp), lp.shape[1], "dense", k)
    assert not RunDir.topk_preds_in(tmp_path, "test").exists()
    assert StoredPredictions.open(tmp_path, "test").form == "dense"


def test_choose_form_and_the_too_large_dense_request():
    auto = GeneralistConfig(dense_predictions_limit_mb=1)
    assert choose_form(auto, {"val": 100, "test": 100}, 1000) == "dense"              # 0.4 MB
    assert choose_form(auto, {"val": 100, "test": 1000}, 1000) == "topk"              # 4 MB
    assert choose_form(GeneralistConfig(predictions="topk", predictions_top_k=64), {"val": 9}, 50) == "dense"
    dense = GeneralistConfig(predictions="dense", dense_predictions_limit_mb=1)
    with pytest.raises(SpecdistillError) as info:
        choose_form(dense, {"val": 200_000, "test": 200_000}, 15_000)
    message = str(info.value)
    assert "\n" not in message and "11.2 GiB" in message and "generalist.predictions=topk" in message


def test_a_too_large_dense_request_stops_before_training(tmp_path, capsys):
    from specdistill.cli import main

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["generalist", "--config", str(TINY), "--run-dir", str(run), "--set", "generalist.predictions=dense",
              "--set", "generalist.dense_predictions_limit_mb=0.01"])
    assert info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dense_predictions_limit_mb=0.01" in err[0] and "generalist.predictions=topk" in err[0]
    assert not (run / "generalist" / "model.safetensors").exists() and not list(run.glob("generalist/**/*.safetensors"))


def test_new_options_at_their_defaults_keep_the_stage_hashes():
    cfg = load_config(TINY)
    changed = load_config(TINY, ["generalist.predictions=topk"])
    assert stage_hash(cfg, "generalist") != stage_hash(changed, "generalist")
    tree = cfg.model_dump(mode="json")
    for key in ("predictions", "predictions_top_k", "dense_predictions_limit_mb"):
        del tree["generalist"][key]
    assert json.dumps(tree, sort_keys=True) != json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    assert stage_hash(Config.model_validate(tree), "generalist") == stage_hash(cfg, "generalist")


# ---------------------------------------------------------------------------------------------- readers


def test_clustering_from_a_topk_store_matches_the_dense_one(tmp_path):
    from clustering.build import main
    from specdistill.artifacts import write_json
    from specdistill.provenance import mark_done
    from testkit.synthetic_predictions import make_synthetic_predictions

    K = 60
    synth = make_synthetic_predictions(K, K * 40, 5, mates_per_row=3, dense=True, seed=0)
    lp = np.log(np.maximum(synth.probs, 1e-30)).astype(np.float32)
    lp -= np.log(np.exp(lp.astype(np.float64)).sum(1, keepdims=True)).astype(np.float32)
    groups = {}
    for form in ("dense", "topk"):
        run = tmp_path / form
        write_predictions(run / "generalist", "val", _batches(lp, 500), len(lp), K, form, 12)
        write_json(run / "generalist" / "meta.json", {"class_names": [f"c{i}" for i in range(K)], "num_classes": K})
        mark_done(run, "generalist", stage_hash(Config(run_dir=str(run)), "generalist"))
        main(["--k", "12", "--run-dir", str(run), "--backend", "sklearn"])
        clusters = json.loads((run / "clustering" / "clusters.json").read_text())
        assert clusters["num_classes"] == K
        groups[form] = sorted(tuple(g["classes"]) for g in clusters["groups"])
    assert groups["topk"] == groups["dense"]
    planted = sorted(tuple(np.flatnonzero(synth.group_of == g)) for g in range(synth.num_groups))
    assert groups["topk"] == planted


def _topk_run_before_combine(run: Path, *overrides: str):
    """The tiny config with top-k predictions forced, its generalist (untrained) and clusters written by
    the stages, and an untrained specialist per group: everything combine reads."""
    from clustering.build import run_clustering
    from generalist.train import write_generalist
    from specdistill.data import load_data
    from specdistill.models import build_model, save_classifier
    from specdistill.provenance import mark_done
    from specdistill.records import SpecialistInfo

    cfg = load_config(TINY, [f"run_dir={run}", "device=cpu", "generalist.predictions=topk",
                             "generalist.predictions_top_k=5", *overrides])
    paths = RunDir.of(cfg)
    dataset = load_data(cfg.data, cfg.seed)
    K = dataset.num_classes
    torch.manual_seed(0)
    model = build_model(cfg.generalist.model, K, dataset.channels, dataset.image_size)
    write_generalist(cfg, paths.generalist, model, dataset, torch.device("cpu"), cfg.generalist.model,
                     {}, time.perf_counter())
    mark_done(run, "generalist", stage_hash(cfg, "generalist"))
    for split in ("val", "test"):
        assert paths.generalist_preds(split).exists() is False
        assert StoredPredictions.open(paths.generalist, split).top_k == 5
    clusters = run_clustering(cfg, progress=False)
    assert clusters.details["input"]["source"].endswith("preds-val-topk.npz")
    meta = {"model": cfg.generalist.model.model_dump(), "channels": dataset.channels,
            "image_size": dataset.image_size}
    for group in clusters.groups:
        specialist = build_model(cfg.generalist.model, len(group.classes) + 1, dataset.channels, dataset.image_size)
        save_classifier(paths.specialist_weights(group.id), specialist, {**meta, "num_classes": len(group.classes) + 1})
        SpecialistInfo(group.id, group.classes, group.names, 0.0).write(paths.specialist_info(group.id))
    mark_done(run, "specialists", stage_hash(cfg, "specialists"), ids=[g.id for g in clusters.groups])
    return cfg, dataset, model


def test_combine_runs_from_a_topk_generalist_store(tmp_path):
    """Generalist writer, clustering and combine (calibrated, so the held-out generalist comes from
    its forward pass) on top-k files only."""
    from combine.calibration import fit_temperature
    from combine.evaluate import run_combine
    from specdistill.engine import predict_log_probs
    from specdistill.provenance import is_done

    run = tmp_path / "run"
    cfg, dataset, model = _topk_run_before_combine(run, "combine.calibrate=true")
    paths, K = RunDir.of(cfg), dataset.num_classes
    result = run_combine(cfg)
    gen_val = torch.as_tensor(predict_log_probs(model.eval(), dataset.val.images))
    calibration = json.loads(paths.calibration.read_text())
    assert calibration["generalist"] == pytest.approx(fit_temperature(gen_val, dataset.val.labels), rel=1e-6)
    test_acc = float((predict_log_probs(model.eval(), dataset.test.images).argmax(1) == dataset.test.labels).mean())
    assert result.table3("test")["generalist_acc"] == pytest.approx(test_acc, abs=1e-9)
    for split in ("val", "test"):   # the ensemble's predictions in the same top-k form
        stored = StoredPredictions.open(paths.combine, split)
        assert stored.form == "topk" and stored.num_examples == len(dataset.split(split)) and stored.num_classes == K
    assert is_done(run, "combine", stage_hash(cfg, "combine"))


def test_combine_over_its_memory_limit_runs_the_generalist_per_chunk_with_the_same_numbers(tmp_path, monkeypatch):
    """combine.memory_limit_mb below a split's [N, K]: the generalist runs again for every chunk of
    rows each step reads (calibration, both gate passes, the evaluation), and every number, the gate,
    the temperatures and the stored predictions equal those of the run that held it whole."""
    import combine.outputs
    from combine.evaluate import run_combine

    cfg, dataset, _ = _topk_run_before_combine(tmp_path / "run", "combine.calibrate=true", "combine.gate=both")
    paths = RunDir.of(cfg)
    n_val, K = len(dataset.val), dataset.num_classes
    monkeypatch.setattr(combine.outputs, "CHUNK_BYTES", 4 * K * 16)   # 16 rows a chunk
    assert n_val > 3 * 16
    whole = run_combine(cfg)
    kept = {name: paths.combine.joinpath(name).read_bytes() for name in ("calibration.json", "gating.json")}
    stored = {split: StoredPredictions.open(paths.combine, split).top() for split in ("val", "test")}
    limited = cfg.model_copy(update={"combine": cfg.combine.model_copy(update={"memory_limit_mb": 0.001})})
    assert stage_hash(limited, "combine") == stage_hash(cfg, "combine")   # how it runs, not what it makes
    chunked = run_combine(limited, force=True)
    for split in ("val", "test"):
        a, b = whole.split(split), chunked.split(split)
        assert a.timings["forward"]["generalist_passes"] == 1
        # calibration (1 pass), gate (2), evaluation (1) on val; evaluation on test
        assert b.timings["forward"]["generalist_passes"] == (1 + 4 if split == "val" else 1 + 1)
        assert a.table4 == b.table4 and a.table4_causes == b.table4_causes
        assert a.active_specialists == b.active_specialists
        for system, numbers in a.systems.items():
            assert b.systems[system] == pytest.approx(numbers, rel=1e-9), system
        again = StoredPredictions.open(paths.combine, split).top()
        for x, y in zip(stored[split], again):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert whole.gate == chunked.gate
    for name, content in kept.items():
        assert paths.combine.joinpath(name).read_bytes() == content


def test_the_generalist_writes_small_predictions_as_before(tmp_path):
    """Dense (the default, auto, for a small split): byte for byte what np.save of the whole array wrote."""
    from generalist.train import write_generalist
    from specdistill.data import load_data
    from specdistill.engine import predict_log_probs
    from specdistill.models import build_model

    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "device=cpu", "generalist.train.eval_batch_size=64"])
    dataset = load_data(cfg.data, cfg.seed)
    torch.manual_seed(0)
    model = build_model(cfg.generalist.model, dataset.num_classes, dataset.channels, dataset.image_size)
    out = RunDir.of(cfg).generalist
    write_generalist(cfg, out, model, dataset, torch.device("cpu"), cfg.generalist.model, {}, time.perf_counter())
    for split in ("val", "test"):
        buffer = io.BytesIO()
        np.save(buffer, predict_log_probs(model.eval(), dataset.split(split).images, 64, "cpu"), allow_pickle=False)
        assert RunDir.preds_in(out, split).read_bytes() == buffer.getvalue()
        assert not RunDir.topk_preds_in(out, split).exists()


def test_evaluate_in_blocks_matches_the_whole(monkeypatch, tiny_splits):
    """Held-out evaluation of a large K never holds [N, K] logits whole; the numbers are the same."""
    from specdistill import engine
    from specdistill.config import ModelConfig
    from specdistill.models import build_model

    _, val = tiny_splits
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=[16]), 10, 1, 16)
    whole = engine.evaluate(model, val, batch_size=32)
    monkeypatch.setattr(engine, "_EVALUATE_WHOLE_BYTES", 0)
    blocks = engine.evaluate(model, val, batch_size=32)
    assert blocks["acc"] == pytest.approx(whole["acc"], abs=1e-7)
    assert blocks["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_eval_limit_samples_held_out_and_test_only():
    from specdistill.data import load_data

    whole = load_data(load_config(TINY).data)
    cut = load_data(load_config(TINY, ["data.eval_limit=50"]).data)
    assert len(cut.train) == len(whole.train) and len(cut.val) == len(cut.test) == 50 < len(whole.val)
    assert set(cut.val.labels) <= set(whole.val.labels)
    limited = load_config(TINY, ["data.eval_limit=50"])
    assert stage_hash(limited, "generalist") != stage_hash(load_config(TINY), "generalist")
